"""Fuzzing the input readers with mutated files: a corrupt TIFF or result file must give either a correct read or a
one-line InputError naming the file — never another exception, never a hang.

Small valid files (a 2-D uint8 TIFF, a zlib-compressed uint8 TIFF, a 64×64-tiled uint16 TIFF and a result HDF5
written by ``write_result``) are mutated ~150 times each with a seeded RNG: random byte flips, truncation at a
random offset, runs of zero bytes. Each TIFF is read with ``open_source`` (the package's one image reader), the
result file with ``read_result`` and with ``open_source`` (``file.h5:/mean``). Case ``i`` of file ``f`` is fully
determined by ``np.random.default_rng([FILE index, i])`` (see :func:`mutate`), so a failure is reproduced with::

    python tests/test_fuzz_readers.py --case <file> <i>

The cases run in a child process (this file with ``--worker``) that guards every case with ``signal.alarm`` and
runs under an address-space limit, so a hang or a runaway allocation shows up as a failed case instead of a
stuck or swapping test run; the parent also bounds the whole child with a timeout.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FILES = ("plain_u8.tif", "zlib_u8.tif", "tiled_u16.tif", "result.h5")
CASES = 150
CASE_TIMEOUT_S = 5
MEMORY_LIMIT = 4 << 30          # address space of the worker: a corrupt header must not make it allocate more
SHAPES = {"plain_u8.tif": (37, 53), "zlib_u8.tif": (61, 45), "tiled_u16.tif": (150, 130), "result.h5": (20, 24)}

# Reader crashes found by this fuzzer (tifffile 2026.3.3, h5py 3.16.0 / HDF5 2.0.0, numpy 2.4): class → (reason,
# reproducers as (file, case)). Reproduce one with ``python tests/test_fuzz_readers.py --case <file> <case>``.
# All are fixed in the readers; each class stays as a regression test (all its cases in one child), and the
# bulk runs include these cases too.
CRASH_CLASSES: dict[str, tuple[str, list[tuple[str, int]]]] = {
    "tiff-series-zero-division": (
        "ZeroDivisionError from tifffile's TiffFile.series (detect_series) on a corrupt tag escapes open_source "
        "(TiffSource.__init__) and the former read_image: ZeroDivisionError was not in READ_ERRORS (now "
        "regions.READ_ERRORS)",
        [("plain_u8.tif", 45), ("zlib_u8.tif", 75), ("zlib_u8.tif", 108), ("zlib_u8.tif", 138),
         ("tiled_u16.tif", 15), ("tiled_u16.tif", 29)]),
    "read-plane-reshape": (
        "ValueError 'cannot reshape array of size 0 into shape (Y,X)' from the reshape in the former "
        "images._read_plane (read_image, since removed), after its try block (tifffile returns an empty array "
        "for a corrupt BitsPerSample); the cases stay as regression cases of open_source, which gives a clean "
        "InputError for the same files",
        [("plain_u8.tif", 48), ("plain_u8.tif", 63), ("zlib_u8.tif", 134)]),
    "strip-rowsperstrip-zero": (
        "ZeroDivisionError in the former hand-written segment reader of regions.TiffSource (since replaced by "
        "tifffile's aszarr): rps = min(rowsperstrip, imagelength) is 0 for a corrupt RowsPerStrip (here the tile "
        "tags of the tiled file were destroyed), then y0 // rps",
        [("tiled_u16.tif", 104)]),
    "tiff-huge-region-hang": (
        "hang (> 5 s) in regions.ChunkCache.read (and ~13 s in the former segment reader): a corrupt ImageWidth or "
        "ImageLength declares a plane of 1.6e9 or 2e8 pixels; listing its ~25 million tiles came before allocating "
        "the output, which fails at once under the worker's address-space limit; the output is now allocated "
        "first (found by 1,000 extra cases per TIFF beyond the bulk runs)",
        [("tiled_u16.tif", 687), ("tiled_u16.tif", 852)]),
    "result-h5py-errors": (
        "read_result wraps only h5py.File(): OSError (gzip filter failure, 'ran off end of input buffer', 'addr "
        "overflow'), RuntimeError (link existence check / link iteration) and KeyError (object open) raised "
        "later by attribute reads, `name in f`, dataset reads and group iteration escape",
        [("result.h5", c) for c in (6, 9, 11, 18, 24, 27, 30, 36, 39, 41, 42, 44, 48, 57, 66, 68, 72, 81, 83,
                                    95, 99, 102, 108, 111, 113, 114, 116, 120, 123, 132, 138)]),
    "result-none-item": (
        "TypeError \"'NoneType' object is not subscriptable\" in read_result: h5py's Group.items() yields None "
        "for a link it cannot resolve, and v[()] is applied to it (params / history groups)",
        [("result.h5", 69), ("result.h5", 125)]),
    "result-vlen-attribute-hang": (
        "read_result never returns: reading the variable-length string root attribute config_yaml whose global "
        "heap is corrupt (28 zero bytes at offset 4127) loops inside libhdf5, holding the GIL, so no signal "
        "or exception can stop it; only a watchdog process can (or text metadata stored without the global "
        "heap, e.g. fixed-length bytes attributes or a uint8 dataset)",
        [("result.h5", 140)]),
}


# ------------------------------------------------------------------------------------------------ files and mutations

def write_originals(folder: Path) -> dict[str, Path]:
    """The four small valid files."""
    import tifffile

    from hpc_zsem.io.volumes import write_result

    rng = np.random.default_rng(2024)
    paths = {name: folder / name for name in FILES}
    tifffile.imwrite(paths["plain_u8.tif"], rng.integers(0, 256, SHAPES["plain_u8.tif"], dtype=np.uint8))
    tifffile.imwrite(paths["zlib_u8.tif"], rng.integers(0, 256, SHAPES["zlib_u8.tif"], dtype=np.uint8),
                     compression="zlib")
    tifffile.imwrite(paths["tiled_u16.tif"], rng.integers(0, 4000, SHAPES["tiled_u16.tif"], dtype=np.uint16),
                     tile=(64, 64))
    Y, X = SHAPES["result.h5"]
    write_result(paths["result.h5"], mean=rng.random((Y, X)), variance=rng.random((Y, X)),
                 noisy=rng.random((Y, X)), params={"W": rng.random((4, 3)), "sigma2": np.array(0.5)},
                 history={"epoch": [1, 2], "free_energy": [-3.0, -2.5]},
                 metadata={"model": "sssc", "config_yaml": "a: 1\n", "note": ["x", "y"]})
    return paths


def mutate(data: bytes, file_index: int, case: int) -> tuple[bytes, str]:
    """Case ``case`` of file ``file_index``: (mutated bytes, description)."""
    rng = np.random.default_rng([file_index, case])
    buf = bytearray(data)
    kind = ("flip", "truncate", "zeros")[case % 3]
    # a third of the flips and zero runs hit the first 512 bytes, where the headers and IFDs are
    span = 512 if rng.random() < 1 / 3 else len(buf)
    if kind == "flip":
        n = int(rng.integers(1, 9))
        where = rng.integers(0, min(span, len(buf)), n)
        for i in where:
            buf[i] ^= int(rng.integers(1, 256))
        return bytes(buf), f"flip {n} bytes at {sorted(int(i) for i in where)}"
    if kind == "truncate":
        at = int(rng.integers(0, len(buf)))
        return bytes(buf[:at]), f"truncate at {at} of {len(buf)}"
    start = int(rng.integers(0, min(span, len(buf))))
    length = int(rng.integers(1, 65))
    buf[start:start + length] = bytes(len(buf[start:start + length]))
    return bytes(buf), f"zero {length} bytes at {start}"


# ------------------------------------------------------------------------------------------------ readers under test

def _tiff_header_shape(path: Path) -> tuple[int, ...]:
    """(Y, X) that the TIFF headers declare for the first series' full-resolution level, as tifffile's public
    API reports it (the original shape unless the mutation rewrote the dimension tags)."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        series = series.levels[0] if series.levels else series
        return tuple(series.shape[-2:])


def _read_lazy(spec: str, tiff: bool = False) -> str:
    """open_source must give a 2-D float64 section of its declared shape — for a TIFF the shape its headers
    declare — and an inner region equal to the same pixels of the whole section."""
    from hpc_zsem.io.regions import open_source
    with open_source(spec) as src:
        Y, X = src.plane_shape
        whole = src.read_section()
        assert whole.shape == (Y, X) and whole.dtype == np.float64, (whole.shape, whole.dtype)
        if tiff:
            assert (Y, X) == _tiff_header_shape(Path(spec)), ((Y, X), _tiff_header_shape(Path(spec)))
        if Y > 2 and X > 2:   # an inner region too (touches fewer segments)
            part = src.read(0, 1, Y - 1, 1, X - 1)
            assert part.shape == (Y - 2, X - 2)
            np.testing.assert_array_equal(part, whole[1:-1, 1:-1])
        return f"ok {(Y, X)}"


def _read_result(path: Path) -> str:
    from hpc_zsem.io.results import read_result
    out = read_result(path)
    shapes = {name: np.shape(out[name]) for name in ("mean", "variance", "input")}
    assert all(len(s) == 2 for s in shapes.values()), shapes
    assert isinstance(out["params"], dict) and isinstance(out["history"], dict)
    assert isinstance(out["metadata"], dict)
    return f"ok {shapes['mean']}"


def readers_for(name: str, path: Path):
    if name.endswith(".h5"):
        return {"read_result": lambda: _read_result(path), "open_source": lambda: _read_lazy(f"{path}:/mean")}
    return {"open_source": lambda: _read_lazy(str(path), tiff=True)}


def _where(exc: BaseException) -> str:
    """'file:line' of the innermost frame in hpc_zsem and of the innermost frame overall."""
    import traceback
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "hpc_zsem" in f.filename]
    fmt = lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}"   # noqa: E731
    inner = fmt(frames[-1]) if frames else "?"
    return f"{fmt(ours[-1]) if ours else '?'} -> {inner}"


def run_case(name: str, original: bytes, case: int, folder: Path) -> list[dict]:
    """Run every reader on mutated case ``case`` of ``name``; one outcome dict per reader. A per-case
    watchdog (faulthandler, which fires even while C code holds the GIL) ends the process on a hang."""
    import faulthandler

    from hpc_zsem.errors import InputError

    data, what = mutate(original, FILES.index(name), case)
    path = folder / f"case{case}_{name}"
    path.write_bytes(data)
    outcomes = []
    for reader, call in readers_for(name, path).items():
        row = {"file": name, "case": case, "mutation": what, "reader": reader}
        print(json.dumps({"start": case, "reader": reader}), flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        t0 = time.perf_counter()
        try:
            row.update(outcome="ok", detail=call())
        except InputError as exc:
            msg = str(exc)
            clean = "\n" not in msg and str(path) in msg
            row.update(outcome="input_error" if clean else "bad_message", detail=msg[:300])
        except BaseException as exc:   # noqa: BLE001 - the point is to catch everything else
            row.update(outcome="crash", detail=f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:300],
                       where=_where(exc))
        finally:
            faulthandler.cancel_dump_traceback_later()
        row["seconds"] = round(time.perf_counter() - t0, 4)
        outcomes.append(row)
        print(json.dumps(row), flush=True)
    path.unlink()
    return outcomes


def _worker(name: str, original: Path, cases: list[int]) -> None:
    """Child process: run the cases, JSON lines on stdout ({"start": ...} before each reader call)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    data = original.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        for case in cases:
            run_case(name, data, case, Path(folder))


def run_in_child(name: str, original: Path, cases: list[int], timeout: float = 300) -> list[dict]:
    """Run cases in child processes. A child that ends early (a hang caught by the watchdog, a crash of the
    interpreter) becomes a 'hang'/'died' outcome of the reader call it was in, and a new child carries on with
    the next case."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows: list[dict] = []
    todo = list(cases)
    while todo:
        cmd = [sys.executable, __file__, "--worker", name, str(original), ",".join(map(str, todo))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            stdout, rc, err = proc.stdout, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rc, err = "timeout", ""
        last = None
        for line in stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                last = record
            else:
                rows.append(record)
        if rc == 0:
            break
        if last is None:
            raise RuntimeError(f"fuzz worker for {name} failed before the first case: {err[-2000:]}")
        hang = "Timeout (" in err
        rows.append({"file": name, "case": last["start"], "reader": last["reader"],
                     "mutation": mutate(original.read_bytes(), FILES.index(name), last["start"])[1],
                     "outcome": "hang" if hang else "died",
                     "detail": (f"no result after {CASE_TIMEOUT_S}s; " if hang else f"child exit {rc}; ")
                     + " | ".join(err.strip().splitlines()[-4:])[-400:]})
        todo = todo[todo.index(last["start"]) + 1:]
    return rows


# ------------------------------------------------------------------------------------------------ the tests

def _originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_originals")
    return write_originals(folder)


def pytest_generate_tests(metafunc):
    if "crash_class" in metafunc.fixturenames:
        metafunc.parametrize("crash_class", list(CRASH_CLASSES))


def _bulk(name, tmp_path_factory):
    paths = _originals(tmp_path_factory)
    cases = list(range(CASES))
    rows = run_in_child(name, paths[name], cases)
    bad = [r for r in rows if r["outcome"] not in ("ok", "input_error")]
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("ok", "input_error")}
    print(f"{name}: {len(cases)} mutations, {counts}, slowest case {max(r.get('seconds', 0) for r in rows):.3f}s")
    assert not bad, "\n".join(json.dumps(r) for r in bad[:20])
    # the mutations must actually exercise both paths
    assert counts["input_error"] > 0
    return rows


def test_originals_read_back(tmp_path_factory):
    """The unmutated files read correctly through every reader (the oracle of the fuzz cases)."""
    import tifffile

    from hpc_zsem.io.regions import open_source
    from hpc_zsem.io.results import read_result

    paths = _originals(tmp_path_factory)
    for name in FILES[:3]:
        assert _read_lazy(str(paths[name]), tiff=True) == f"ok {SHAPES[name]}"
        with open_source(paths[name]) as src:
            np.testing.assert_array_equal(src.read_section(), tifffile.imread(paths[name]))
    assert read_result(paths["result.h5"])["mean"].shape == SHAPES["result.h5"]
    with open_source(f"{paths['result.h5']}:/mean") as src:
        assert src.shape == SHAPES["result.h5"]


def test_mutation_is_deterministic():
    data = bytes(range(256)) * 8
    for case in range(6):
        assert mutate(data, 1, case) == mutate(data, 1, case)
    assert mutate(data, 1, 0) != mutate(data, 2, 0)


def test_fuzz_plain_uint8_tiff(tmp_path_factory):
    _bulk("plain_u8.tif", tmp_path_factory)


def test_fuzz_zlib_uint8_tiff(tmp_path_factory):
    _bulk("zlib_u8.tif", tmp_path_factory)


def test_fuzz_tiled_uint16_tiff(tmp_path_factory):
    _bulk("tiled_u16.tif", tmp_path_factory)


def test_fuzz_result_hdf5(tmp_path_factory):
    _bulk("result.h5", tmp_path_factory)


def test_known_reader_crash(crash_class, tmp_path_factory):
    """Regression test: the recorded reproducers of one crash class that fuzzing found (see CRASH_CLASSES;
    all fixed) now give a result or a clean InputError."""
    paths = _originals(tmp_path_factory)
    cases = CRASH_CLASSES[crash_class][1]
    rows = []
    for name in sorted({name for name, _ in cases}):
        rows += run_in_child(name, paths[name], [c for n, c in cases if n == name], timeout=120)
    bad = [r for r in rows if r["outcome"] not in ("ok", "input_error")]
    assert not bad, "\n".join(json.dumps(r) for r in bad)


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(sys.argv[2], Path(sys.argv[3]), [int(c) for c in sys.argv[4].split(",") if c])
    elif sys.argv[1] == "--case":   # reproduce one case in this process, with tracebacks
        with tempfile.TemporaryDirectory() as d:
            originals = write_originals(Path(d))
            name, case = sys.argv[2], int(sys.argv[3])
            data, what = mutate(originals[name].read_bytes(), FILES.index(name), case)
            target = Path(d) / f"case{case}_{name}"
            target.write_bytes(data)
            print(name, case, what)
            for reader, call in readers_for(name, target).items():
                print(reader, "→", end=" ")
                try:
                    print(call())
                except Exception:   # noqa: BLE001
                    import traceback
                    traceback.print_exc()
