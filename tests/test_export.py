"""Tests of the ``export`` subcommand: files written, their values, naming, refusals, failures."""
import argparse
import errno
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from hpc_zsem import cli, enhance, export
from hpc_zsem.errors import ConfigError, InputError, OutputError
from hpc_zsem.io import results


def write_result(path: Path, shape=(24, 32), with_input=True, seed=0) -> dict[str, np.ndarray]:
    """A result file as hpc_zsem.io.results writes it; returns the arrays stored."""
    rng = np.random.default_rng(seed)
    arrays = {"mean": rng.normal(10, 3, shape).astype(np.float32),
              "variance": rng.gamma(2.0, 0.5, shape).astype(np.float32)}
    if with_input:
        arrays["input"] = arrays["mean"] + rng.normal(0, 1, shape).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "hpc_zsem-result"
        f.attrs["format_version"] = 1
        f.attrs["model"] = "sssc"
        for name, data in arrays.items():
            f[name] = data
        f.create_group("params")["W"] = np.zeros((4, 3))
    return arrays


def run_export(*argv) -> int:
    """Parse ``hpc-zsem export ARGV`` as the CLI does and dispatch it."""
    parser = argparse.ArgumentParser(prog="hpc-zsem")
    export.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.func(args)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def test_default_export_of_a_2d_result(tmp_path, capsys):
    arrays = write_result(tmp_path / "run.h5")
    assert run_export(tmp_path / "run.h5") == 0
    out = tmp_path / "run_export"
    names = ["run_mean.tif", "run_variance.tif", "run_mean.png", "run_variance.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert capsys.readouterr().out.split() == [str(out / name) for name in names]
    for kind in ("mean", "variance"):
        tiff = tifffile.imread(out / f"run_{kind}.tif")
        assert tiff.dtype == np.float32
        np.testing.assert_array_equal(tiff, arrays[kind])


def test_png_stretch_maps_chosen_percentiles_to_0_and_255(tmp_path):
    arrays = write_result(tmp_path / "r.h5")
    run_export(tmp_path / "r.h5", "--out", tmp_path / "x", "--format", "png", "--low", 5, "--high", 90)
    for kind in ("mean", "variance"):
        img = arrays[kind]
        lo, hi = np.percentile(img, [5, 90])
        png = read_png(tmp_path / "x" / f"r_{kind}.png")
        assert png.shape == img.shape + (3,) and png.dtype == np.uint8
        grey = png[..., 0]
        assert np.all(grey[img <= lo] == 0) and np.all(grey[img >= hi] == 255)
        inner = (img > lo) & (img < hi)
        np.testing.assert_array_equal(grey[inner], np.round((img[inner] - lo) / (hi - lo) * 255))


def test_uint16_tiff_and_colour_map(tmp_path):
    arrays = write_result(tmp_path / "r.h5")
    run_export(tmp_path / "r.h5", "--tiff-dtype", "uint16", "--cmap", "viridis", "--gamma", 2)
    out = tmp_path / "r_export"
    tiff = tifffile.imread(out / "r_mean.tif")
    assert tiff.dtype == np.uint16 and tiff.min() == 0 and tiff.max() == 65535
    expected = enhance.to_uint16(enhance.contrast_stretch(arrays["mean"]))  # gamma is display-only
    np.testing.assert_array_equal(tiff, expected)
    png = read_png(out / "r_variance.png")
    expected_png = enhance.apply_colormap(enhance.contrast_stretch(arrays["variance"], gamma=2), "viridis")
    np.testing.assert_array_equal(png, expected_png)


def test_two_tone_from_mask_image(tmp_path):
    arrays = write_result(tmp_path / "r.h5")
    mask = np.zeros((24, 32), np.uint8)
    mask[5:15, 8:20] = 255
    tifffile.imwrite(tmp_path / "cells.tif", mask)
    run_export(tmp_path / "r.h5", "--format", "png", "--mask", tmp_path / "cells.tif")
    png = read_png(tmp_path / "r_export" / "r_variance_twotone.png")
    brightness = enhance.contrast_stretch(arrays["variance"])
    np.testing.assert_array_equal(png, enhance.two_tone(brightness, mask != 0))
    lit = png.max(axis=-1) > 50
    assert np.all(png[lit & (mask != 0)][:, 2] > png[lit & (mask != 0)][:, 0])  # blue inside
    assert np.all(png[lit & (mask == 0)][:, 0] > png[lit & (mask == 0)][:, 2])  # yellow outside


def test_two_tone_from_threshold_on_the_mean(tmp_path):
    arrays = write_result(tmp_path / "r.h5")
    run_export(tmp_path / "r.h5", "--format", "png", "--threshold", 10)
    png = read_png(tmp_path / "r_export" / "r_variance_twotone.png")
    expected = enhance.two_tone(enhance.contrast_stretch(arrays["variance"]), arrays["mean"] > 10)
    np.testing.assert_array_equal(png, expected)


def test_mask_shape_mismatch_names_the_mask(tmp_path):
    write_result(tmp_path / "r.h5")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(InputError, match="m.png.*shape"):
        run_export(tmp_path / "r.h5", "--mask", tmp_path / "m.png")
    assert not (tmp_path / "r_export").exists()


@pytest.mark.parametrize("with_input, tiles", [(True, 3), (False, 2)])
def test_panel(tmp_path, with_input, tiles):
    write_result(tmp_path / "r.h5", with_input=with_input)
    run_export(tmp_path / "r.h5", "--format", "png", "--panel")
    panel = read_png(tmp_path / "r_export" / "r_panel.png")
    assert panel.ndim == 3 and panel.shape[2] == 3
    assert panel.shape[1] == tiles * 32 + (tiles + 1) * 8


def test_volume_export_writes_selected_sections_only(tmp_path, capsys):
    arrays = write_result(tmp_path / "vol.h5", shape=(6, 12, 16))
    run_export(tmp_path / "vol.h5", "--sections", "4,1", "--out", tmp_path / "o", "--threshold", 10, "--panel")
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    kinds = ["mean.tif", "variance.tif", "mean.png", "variance.png", "variance_twotone.png", "panel.png"]
    expected = sorted(f"vol_{kind.split('.')[0]}_z{z:03d}.{kind.split('.')[1]}" for z in (1, 4) for kind in kinds)
    assert names == expected
    assert len(capsys.readouterr().out.split()) == len(expected)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o" / "vol_variance_z004.tif"), arrays["variance"][4])


def test_volume_stretch_is_shared_by_the_selected_sections(tmp_path):
    arrays = write_result(tmp_path / "vol.h5", shape=(3, 12, 16))
    run_export(tmp_path / "vol.h5", "--format", "png", "--sections", "0,2")
    lo, hi = np.percentile(arrays["mean"][[0, 2]], [0.5, 99.5])
    png = read_png(tmp_path / "vol_export" / "vol_mean_z002.png")[..., 0]
    np.testing.assert_array_equal(png, enhance.to_uint8(enhance.stretch(arrays["mean"][2], lo, hi)))


@pytest.mark.parametrize("spec, message", [("6", "section 6 out of range"), ("1,x", "comma-separated"),
                                           ("-1", "out of range")])
def test_bad_sections(tmp_path, spec, message):
    write_result(tmp_path / "vol.h5", shape=(6, 8, 8))
    with pytest.raises(InputError, match=message) as info:
        run_export(tmp_path / "vol.h5", "--sections", spec)
    assert "vol.h5" in str(info.value)


def test_sections_on_a_2d_result_is_an_error(tmp_path):
    write_result(tmp_path / "r.h5")
    with pytest.raises(InputError, match="2-D"):
        run_export(tmp_path / "r.h5", "--sections", "0")


def test_existing_output_is_not_overwritten(tmp_path):
    write_result(tmp_path / "r.h5", seed=0)
    run_export(tmp_path / "r.h5")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r_export").iterdir()}
    write_result(tmp_path / "r.h5", seed=1)
    with pytest.raises(OutputError, match="overwrite"):
        run_export(tmp_path / "r.h5", "--panel")
    assert {p.name: p.read_bytes() for p in (tmp_path / "r_export").iterdir()} == before  # nothing written
    run_export(tmp_path / "r.h5", "--overwrite")
    assert (tmp_path / "r_export" / "r_mean.tif").read_bytes() != before["r_mean.tif"]


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(InputError, match="nope.h5"):
        run_export(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="text.h5: not an HDF5"):
        run_export(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["mean"] = np.zeros((4, 4))
    with pytest.raises(InputError, match="other.h5: not an hpc_zsem result"):
        run_export(tmp_path / "other.h5")


def test_low_must_be_below_high(tmp_path):
    write_result(tmp_path / "r.h5")
    with pytest.raises(ConfigError, match="--low"):
        run_export(tmp_path / "r.h5", "--low", 60, "--high", 40)


def cli_export(capsys, *argv) -> tuple[int, str]:
    """Run ``hpc-zsem export ARGV`` through the CLI entry point: (exit code, stderr)."""
    code = cli.main(["export", *map(str, argv)])
    return code, capsys.readouterr().err


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` by name, with its contents."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("option, value, expected", [
    ("--threshold", "nan", "a finite number"), ("--threshold", "inf", "a finite number"),
    ("--threshold", "-inf", "a finite number"), ("--low", "nan", "a finite number"),
    ("--high", "inf", "a finite number"), ("--gamma", "inf", "a finite number"),
    ("--gamma", "nan", "a finite number"), ("--gamma", "0", "a positive number"),
    ("--low", "-1", "a percentile in [0, 100]"), ("--high", "100.5", "a percentile in [0, 100]")])
def test_non_finite_or_out_of_range_numbers_are_refused_in_one_line(tmp_path, capsys, option, value, expected):
    write_result(tmp_path / "r.h5")
    code, err = cli_export(capsys, tmp_path / "r.h5", f"{option}={value}", "--panel")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"hpc-zsem: error: {option} ") and expected in err
    assert not (tmp_path / "r_export").exists()


def write_real_result(path: Path, shape=(24, 32), seed=0) -> dict[str, np.ndarray]:
    """A result file written by hpc_zsem.io.results (chunked, gzip + shuffle); returns its images."""
    rng = np.random.default_rng(seed)
    images = {"mean": rng.normal(10, 3, shape).astype(np.float32),
              "variance": rng.gamma(2.0, 0.5, shape).astype(np.float32)}
    images["input"] = images["mean"] + rng.normal(0, 1, shape).astype(np.float32)
    results.write_result(path, mean=images["mean"], variance=images["variance"], noisy=images["input"],
                         params={"W": np.zeros((4, 3))}, history={"epoch": [1.0]}, metadata={"model": "sssc"},
                         overwrite=True)
    return images


def corrupt_chunk(path: Path, dataset: str, index: int = 0) -> None:
    """Overwrite the stored bytes of chunk ``index`` of ``dataset`` (so it no longer decompresses)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(index)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)


def test_corrupt_chunk_is_a_one_line_error_naming_file_and_dataset(tmp_path, capsys):
    write_real_result(tmp_path / "r.h5")
    corrupt_chunk(tmp_path / "r.h5", "variance")
    with pytest.raises(InputError, match=r"r\.h5: dataset /variance cannot be read .*corrupt"):
        run_export(tmp_path / "r.h5")
    code, err = cli_export(capsys, tmp_path / "r.h5", "--panel")
    assert code == 2 and err.count("\n") == 1 and "r.h5: dataset /variance" in err
    assert not (tmp_path / "r_export").exists()


def test_corrupt_chunk_of_a_volume_fails_only_the_sections_that_need_it(tmp_path, capsys):
    write_real_result(tmp_path / "v.h5", shape=(4, 12, 16))
    corrupt_chunk(tmp_path / "v.h5", "mean", index=2)   # one chunk per section: section 2
    assert run_export(tmp_path / "v.h5", "--sections", "0,3") == 0
    before = snapshot(tmp_path / "v_export")
    code, err = cli_export(capsys, tmp_path / "v.h5", "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "v.h5: dataset /mean cannot be read" in err
    assert snapshot(tmp_path / "v_export") == before


def fail_on_call(original, n: int, exc: BaseException):
    """A stand-in for a writer ``original(target, ...)``: calls 1..n-1 pass through, call n writes a few bytes
    to its target (if it is a path or an open file) and raises ``exc``."""
    calls = []

    def writer(*args, **kwargs):
        calls.append(1)
        if len(calls) < n:
            return original(*args, **kwargs)
        target = next((a for a in args if hasattr(a, "write") or isinstance(a, (str, os.PathLike))), None)
        if hasattr(target, "write"):
            target.write(b"partial")
        elif target is not None:
            Path(target).write_bytes(b"partial")
        raise exc
    return writer


def enospc() -> OSError:
    """The error of a write to a full disk."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def wrapped_eio() -> RuntimeError:
    """A non-OSError a writer library might raise for a failed write, caused by an EIO."""
    try:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    except OSError as cause:
        try:
            raise RuntimeError("write failed") from cause
        except RuntimeError as exc:
            return exc


FAILURES = {   # where a write fails → (object, attribute, call that fails, exception, text in the message)
    "tiff ENOSPC": (tifffile, "imwrite", 2, enospc, "No space left on device"),
    "png ENOSPC": (Image.Image, "save", 3, enospc, "No space left on device"),
    "panel EIO wrapped": (Image.Image, "save", 4, wrapped_eio, "Input/output error"),
    "fsync ENOSPC": (os, "fsync", 4, enospc, "No space left on device"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_write_keeps_earlier_export_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch, failure):
    owner, name, n, make_exc, message = FAILURES[failure]
    write_result(tmp_path / "r.h5", seed=0)
    assert run_export(tmp_path / "r.h5", "--panel", "--threshold", 10) == 0
    before = snapshot(tmp_path / "r_export")
    write_result(tmp_path / "r.h5", seed=1)
    monkeypatch.setattr(owner, name, fail_on_call(getattr(owner, name), n, make_exc()))
    code, err = cli_export(capsys, tmp_path / "r.h5", "--panel", "--threshold", 10, "--overwrite")
    assert snapshot(tmp_path / "r_export") == before   # no temporary file left, every earlier file as it was
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path / "r_export" / "r_") in err and message in err and "no export file was written" in err


def test_failed_first_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    write_result(tmp_path / "r.h5")
    monkeypatch.setattr(Image.Image, "save", fail_on_call(Image.Image.save, 2, enospc()))
    code, err = cli_export(capsys, tmp_path / "r.h5", "--out", tmp_path / "new")
    assert code == 2 and "No space left on device" in err
    assert not (tmp_path / "new").exists()


def test_other_writer_exceptions_are_crashes_that_still_clean_up(tmp_path, monkeypatch):
    write_result(tmp_path / "r.h5", seed=0)
    run_export(tmp_path / "r.h5")
    before = snapshot(tmp_path / "r_export")
    monkeypatch.setattr(tifffile, "imwrite", fail_on_call(tifffile.imwrite, 2, ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        run_export(tmp_path / "r.h5", "--overwrite")
    assert snapshot(tmp_path / "r_export") == before


def test_failed_rename_leaves_whole_files_only(tmp_path, capsys, monkeypatch):
    write_result(tmp_path / "r.h5", seed=0)
    run_export(tmp_path / "r.h5", "--format", "png")
    before = snapshot(tmp_path / "r_export")
    write_result(tmp_path / "r.h5", seed=1)
    monkeypatch.setattr(os, "replace", fail_on_call(os.replace, 2, OSError(errno.EIO, "Input/output error")))
    code, err = cli_export(capsys, tmp_path / "r.h5", "--format", "png", "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "1 of 2 export files were replaced" in err
    after = snapshot(tmp_path / "r_export")
    assert sorted(after) == sorted(before) and after["r_variance.png"] == before["r_variance.png"]
    assert after["r_mean.png"] != before["r_mean.png"] and read_png(tmp_path / "r_export" / "r_mean.png").size


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs mounted on ``tmp_path/disk`` (skips unless mounting works, i.e. as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_real_disk(tmp_path, capsys, tiny_disk):
    write_real_result(tmp_path / "r.h5", shape=(64, 64))
    assert run_export(tmp_path / "r.h5", "--out", tiny_disk, "--panel") == 0
    before = snapshot(tiny_disk)
    write_real_result(tmp_path / "r.h5", shape=(600, 600), seed=1)   # 2 × 1.4 MB float32 TIFFs: does not fit
    code, err = cli_export(capsys, tmp_path / "r.h5", "--out", tiny_disk, "--panel", "--overwrite")
    assert snapshot(tiny_disk) == before
    assert code == 2 and err.count("\n") == 1 and str(tiny_disk) in err and "MB free" in err


def ink_columns(panel: np.ndarray, image_height: int, pad: int = 8) -> np.ndarray:
    """The x coordinates of the non-background pixels of a panel's title strip (above the images)."""
    top = panel.shape[0] - pad - image_height
    return np.flatnonzero((panel[:top] != 255).any(axis=(0, 2)))


def test_panel_titles_of_64_pixel_images_stay_in_their_columns(tmp_path):
    write_result(tmp_path / "r.h5", shape=(64, 64))
    run_export(tmp_path / "r.h5", "--format", "png", "--panel")
    ink = ink_columns(read_png(tmp_path / "r_export" / "r_panel.png"), 64)
    columns = [(8 + k * 72, 8 + k * 72 + 64) for k in range(3)]   # x ranges of noisy | mean | variance
    boxes = [ink[(ink >= start) & (ink < end)] for start, end in columns]
    assert sum(map(len, boxes)) == len(ink)   # no title ink in the gaps between the columns
    assert all(len(box) for box in boxes)     # every title drawn
    assert all(a.max() < b.min() for a, b in zip(boxes, boxes[1:]))   # the title boxes do not overlap
