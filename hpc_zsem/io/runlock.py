"""An advisory lock per output, so that two runs never write the same result or checkpoint at once.

``fcntl.flock`` on ``<output>.lock`` (and ``<checkpoint.path>.lock`` when the checkpoint lives elsewhere),
taken by rank 0 before any file is looked at and held until the run ends. The lock file holds
"hpc-zsem run lock: host H pid P since T" of its holder, so a second run is refused with a one-line message
naming them; a non-empty file that does not start so is somebody else's and is refused, never truncated or
removed. The kernel releases a flock when its process dies (kill -9 included): a stale lock file never blocks a later
run. The holder removes the file while it still holds the lock; a run that locked a file which was
removed meanwhile locks again, so two runs never hold locks on different files of the same name.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

from hpc_zsem.errors import OutputError

_IDENTITY = b"hpc-zsem run lock: host"   # how every lock file this tool writes starts


class RunLock:
    """Exclusive advisory locks on a few lock files (see the module docstring)."""

    def __init__(self) -> None:
        self._held: list[tuple[Path, int]] = []

    def acquire(self, paths: list[Path]) -> None:
        """Lock every file or raise OutputError (nothing stays locked then)."""
        try:
            for path in dict.fromkeys(Path(p) for p in paths):
                self._held.append((path, _lock(path)))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the lock files and unlock them (idempotent)."""
        while self._held:
            path, fd = self._held.pop()
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(fd)


def _lock(path: Path) -> int:
    """Open ``path``, take an exclusive flock without waiting, write this process's identity; the fd."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file of this run ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(f"{path}: another hpc-zsem run is writing this output ({holder}); wait for it to end "
                              "or choose another output.path / checkpoint.path") from None
        if _is_current(fd, path):
            break
        os.close(fd)           # the holder removed the file after we opened it: lock the new one
    content = os.pread(fd, len(_IDENTITY), 0)
    if content and not content.startswith(_IDENTITY):
        os.close(fd)           # somebody else's file of that name: never truncated or removed
        raise OutputError(f"{path}: exists and is not an hpc-zsem lock file; move it away or choose another "
                          "output.path / checkpoint.path")
    try:
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, _IDENTITY + f" {socket.gethostname()} pid {os.getpid()} since {started}\n".encode())
    except OSError:
        pass                   # the identity is a courtesy for the error message; the lock itself holds
    return fd


def _is_current(fd: int, path: Path) -> bool:
    """True if ``fd`` is still the file at ``path`` (not removed or replaced after it was opened)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> str:
    """What the lock's holder wrote about itself (bounded), or a neutral phrase."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown"
