"""Build hook: ship the top-level ``jobs/`` (SLURM templates) and ``configs/`` (presets) inside the package.

Metadata and options are in ``setup.cfg``; this file only adds one step to ``build_py``. The top-level
directories stay the single source (they are what users read and copy in a checkout); a build copies
:data:`SHIPPED` into ``hpc_zsem/_data/jobs`` and ``hpc_zsem/_data/configs`` of the *build* directory, never of
the source tree, so no second copy is committed. ``MANIFEST.in`` puts the same files into the sdist, so a
wheel built from the sdist has them too. At run time :mod:`hpc_zsem.presets` finds them with
:mod:`importlib.resources`.

Why not the alternatives:

* ``data_files`` installs into ``<prefix>/share/…``, outside the package: not reachable through
  ``importlib.resources``, and ignored by editable installs.
* ``package_data`` only takes files inside a package directory, and mapping ``jobs/`` into the package
  with ``package_dir`` makes it an import package (namespace warnings, a different editable finder).
* Symlinks or copies under ``hpc_zsem/`` would be a second committed source.

Editable installs (``pip install -e .``): setuptools runs ``build_py`` with ``editable_mode`` set and copies
nothing; then ``hpc_zsem/_data`` does not exist and :mod:`hpc_zsem.presets` falls back to the checkout's
``jobs/`` and ``configs/``, so edits there take effect at once.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

#: (source glob relative to the project root, directory inside the package) of every shipped file
SHIPPED = (
    ("jobs/*.sbatch", "_data/jobs"),
    ("jobs/*.sh", "_data/jobs"),
    ("jobs/README.md", "_data/jobs"),
    ("configs/*.yaml", "_data/configs"),
)


class BuildPyWithData(build_py):
    """``build_py`` that also copies :data:`SHIPPED` into ``<build_lib>/hpc_zsem/_data`` (not in editable mode)."""

    def run(self):
        """Build the package as usual, then replace ``hpc_zsem/_data`` in the build directory by fresh copies
        (a file removed from ``jobs/`` or ``configs/`` must not survive in a reused ``build/``)."""
        super().run()
        if self.editable_mode:
            return
        target = os.path.join(self.build_lib, "hpc_zsem", "_data")
        shutil.rmtree(target, ignore_errors=True)
        for pattern, subdir in SHIPPED:
            sources = sorted(glob.glob(pattern))
            if not sources:
                raise FileNotFoundError(f"{pattern}: no files to ship (run the build from the project root)")
            self.mkpath(os.path.join(self.build_lib, "hpc_zsem", subdir))
            for source in sources:
                self.copy_file(source, os.path.join(self.build_lib, "hpc_zsem", subdir, os.path.basename(source)))


setup(cmdclass={"build_py": BuildPyWithData})
