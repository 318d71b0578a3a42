"""Tests of the ``export`` subcommand: files written, their values, naming, refusals, failures."""
import argparse
import errno
import os
import shutil
import subprocess
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from hpc_zsem import cli, enhance, export
from hpc_zsem.errors import ConfigError, InputError, OutputError
from hpc_zsem.io import results, volumes


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
    volumes.write_result(path, mean=images["mean"], variance=images["variance"], noisy=images["input"],
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


# ---------------------------------------------------------------- streaming: bounded memory, sampled limits, bands

def calibrate(path: Path, size) -> None:
    """Give the images of a result file the attribute ``element_size_um`` (float32, as io.volumes writes it)."""
    with h5py.File(path, "r+") as f:
        for name in ("mean", "variance", "input"):
            f[name].attrs["element_size_um"] = np.asarray(size, dtype=np.float32)


def smooth_result(path: Path, shape) -> None:
    """A result file (as hpc_zsem.io.results writes it) of smooth images, which PNG compresses quickly."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    mean = 10 + 3 * np.sin(x / 40) * np.cos(y / 50) + z
    volumes.write_result(path, mean=mean, variance=1 + np.cos(x / 30) ** 2, noisy=mean + np.sin(y),
                         params={}, history={}, metadata={}, overwrite=True)


def export_peak(tmp_path: Path, *options) -> int:
    """The tracemalloc peak (bytes) of an export of ``tmp_path/v.h5`` with ``options``, after the same export
    of a tiny result, so that one-time imports and font loading are not counted."""
    run_export(tmp_path / "tiny.h5", "--out", tmp_path / "o", "--overwrite", *options)
    tracemalloc.start()
    try:
        run_export(tmp_path / "v.h5", "--out", tmp_path / "o", "--overwrite", *options)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_memory_is_bounded_by_a_few_sections_not_the_volume(tmp_path, capsys):
    shape = (8, 512, 512)
    smooth_result(tmp_path / "v.h5", shape)
    smooth_result(tmp_path / "tiny.h5", (2, 16, 16))
    section = 512 * 512 * 4   # bytes of one float32 section; the file holds 3 images × 8 sections
    for options in ([], ["--threshold", "10"], ["--format", "ome-tiff", "--tiff-dtype", "uint16"]):
        assert export_peak(tmp_path, *options) < 3 * section, options   # before streaming: 40 sections
    canvas, _ = enhance.panel_canvas([("t", shape[1:])] * 3)
    assert export_peak(tmp_path, "--format", "png", "--panel") < canvas.nbytes + 2 * section
    capsys.readouterr()


def test_sampled_limits_are_deterministic_and_close_to_the_exact_percentiles(tmp_path, monkeypatch):
    images = write_real_result(tmp_path / "v.h5", shape=(6, 300, 260))
    monkeypatch.setattr(export, "SAMPLE_PIXELS", 40_000)   # < 6 × 300 × 260 pixels: sampled
    monkeypatch.setattr(export, "SAMPLE_BLOCKS", 12)       # of 6 × 2 × 2 chunks
    with results.open_result(tmp_path / "v.h5") as f:
        result = export.Result(f, tmp_path / "v.h5", "all")
        sample = export.sample_pixels(result, "mean")
        np.testing.assert_array_equal(sample, export.sample_pixels(result, "mean"))   # deterministic
    assert 0 < sample.size <= 40_000 and sample.dtype == np.float32
    for pct in (0.5, 50, 99.5):
        estimate = np.percentile(sample, pct)
        rank = 100 * np.mean(images["mean"] <= estimate)
        assert abs(rank - pct) < max(0.3, 0.05 * pct), pct
    run_export(tmp_path / "v.h5", "--format", "png", "--out", tmp_path / "a")
    run_export(tmp_path / "v.h5", "--format", "png", "--out", tmp_path / "b")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_small_selections_use_every_pixel(tmp_path):
    images = write_real_result(tmp_path / "v.h5", shape=(3, 40, 50))
    with results.open_result(tmp_path / "v.h5") as f:
        sample = export.sample_pixels(export.Result(f, tmp_path / "v.h5", "0,2"), "variance")
    np.testing.assert_array_equal(np.sort(sample), np.sort(images["variance"][[0, 2]].ravel()))


def test_large_section_is_written_band_by_band(tmp_path):
    images = write_real_result(tmp_path / "big.h5", shape=(600, 300))   # chunks 256 × 256: 3 bands
    run_export(tmp_path / "big.h5", "--format", "tiff")
    with tifffile.TiffFile(tmp_path / "big_export" / "big_mean.tif") as tif:
        page = tif.pages[0]
        assert page.rowsperstrip == 256 and len(page.dataoffsets) == 3
        np.testing.assert_array_equal(page.asarray(), images["mean"])
    run_export(tmp_path / "big.h5", "--format", "tiff", "--tiff-dtype", "uint16", "--overwrite")
    expected = enhance.to_uint16(enhance.contrast_stretch(images["variance"]))   # sampled = exact here
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "big_export" / "big_variance.tif"), expected)


def test_corrupt_chunk_found_while_writing_fails_cleanly(tmp_path, capsys):
    write_real_result(tmp_path / "big.h5", shape=(600, 300))
    corrupt_chunk(tmp_path / "big.h5", "variance", index=4)   # float32 TIFFs need no first pass
    code, err = cli_export(capsys, tmp_path / "big.h5", "--format", "tiff")
    assert code == 2 and err.count("\n") == 1 and "big.h5: dataset /variance cannot be read" in err
    assert not (tmp_path / "big_export").exists()


def test_volume_mask_is_read_section_by_section(tmp_path):
    images = write_result(tmp_path / "v.h5", shape=(3, 12, 16))
    masks = np.random.default_rng(2).random((3, 12, 16)) < 0.5
    lo, hi = np.percentile(images["variance"][[1, 2]], [0.5, 99.5])
    expected = enhance.two_tone(enhance.stretch(images["variance"][2], lo, hi), masks[2])
    layouts = {"minisblack": {}, "rgb": {"planarconfig": "separate"}}   # one page per section; one of 3 planes
    for photometric, options in layouts.items():
        tifffile.imwrite(tmp_path / "cells.tif", masks.astype(np.uint8) * 255, photometric=photometric, **options)
        assert export._mask_layout(tmp_path / "cells.tif") == ((3, 12, 16), photometric == "minisblack")
        run_export(tmp_path / "v.h5", "--format", "png", "--mask", tmp_path / "cells.tif", "--sections", "1,2",
                   "--overwrite")
        np.testing.assert_array_equal(read_png(tmp_path / "v_export" / "v_variance_twotone_z002.png"), expected)


# ---------------------------------------------------------------- OME-TIFF and calibrated TIFFs

OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def ome_pixels(path: Path) -> tuple[np.ndarray, ET.Element]:
    """The image of an OME-TIFF and its OME-XML ``Pixels`` element (parsed with ElementTree), checking that
    the image is named after the file."""
    with tifffile.TiffFile(path) as tif:
        image = ET.fromstring(tif.ome_metadata).find(f"{OME}Image")
        assert image.get("Name") == path.name.removesuffix(".ome.tif")
        return tif.asarray(), image.find(f"{OME}Pixels")


def test_ome_tiff_of_a_volume_has_all_sections_and_the_pixel_size(tmp_path, capsys):
    images = write_real_result(tmp_path / "v.h5", shape=(6, 40, 30))
    calibrate(tmp_path / "v.h5", (0.03, 0.005, 0.004))
    run_export(tmp_path / "v.h5", "--format", "ome-tiff", "--sections", "1,3,5")
    out = tmp_path / "v_export"
    assert capsys.readouterr().out.split() == [str(out / f"v_{kind}.ome.tif") for kind in ("input", "mean", "variance")]
    for kind in ("input", "mean", "variance"):
        data, pixels = ome_pixels(out / f"v_{kind}.ome.tif")
        np.testing.assert_array_equal(data, images[kind][[1, 3, 5]])
        assert {key: pixels.get(key) for key in ("SizeX", "SizeY", "SizeZ", "Type")} == \
            {"SizeX": "30", "SizeY": "40", "SizeZ": "3", "Type": "float"}
        assert float(pixels.get("PhysicalSizeX")) == 0.004 and float(pixels.get("PhysicalSizeY")) == 0.005
        assert float(pixels.get("PhysicalSizeZ")) == 0.06   # every other section
        assert {pixels.get(f"PhysicalSize{axis}Unit") for axis in "XYZ"} == {"µm"}
        planes = pixels.findall(f"{OME}Plane")
        assert [float(p.get("PositionZ")) for p in planes] == [0.03, 0.09, 0.15]
        assert [int(p.get("TheZ")) for p in planes] == [0, 1, 2]


def test_ome_tiff_of_unevenly_spaced_sections_has_positions_but_no_z_size(tmp_path):
    write_real_result(tmp_path / "v.h5", shape=(6, 20, 20))
    calibrate(tmp_path / "v.h5", (0.05, 0.01, 0.01))
    run_export(tmp_path / "v.h5", "--format", "ome-tiff,png", "--sections", "0,1,4", "--tiff-dtype", "uint16")
    data, pixels = ome_pixels(tmp_path / "v_export" / "v_mean.ome.tif")
    assert data.dtype == np.uint16 and data.shape == (3, 20, 20)
    assert pixels.get("PhysicalSizeZ") is None and pixels.get("PhysicalSizeX") == "0.01"
    assert [float(p.get("PositionZ")) for p in pixels.findall(f"{OME}Plane")] == [0.0, 0.05, 0.2]
    assert (tmp_path / "v_export" / "v_mean_z004.png").exists()


def test_ome_tiff_of_a_2d_result_with_and_without_pixel_size(tmp_path):
    images = write_real_result(tmp_path / "r.h5", shape=(24, 32))
    run_export(tmp_path / "r.h5", "--format", "ome-tiff")
    data, pixels = ome_pixels(tmp_path / "r_export" / "r_mean.ome.tif")
    np.testing.assert_array_equal(data, images["mean"])
    assert pixels.get("SizeZ") == "1" and pixels.get("PhysicalSizeX") is None
    calibrate(tmp_path / "r.h5", (0.0025, 0.002))
    run_export(tmp_path / "r.h5", "--format", "ome-tiff", "--overwrite")
    _, pixels = ome_pixels(tmp_path / "r_export" / "r_variance.ome.tif")
    assert (float(pixels.get("PhysicalSizeX")), float(pixels.get("PhysicalSizeY"))) == (0.002, 0.0025)
    assert pixels.get("PhysicalSizeZ") is None and not pixels.findall(f"{OME}Plane[@PositionZ]")


def resolution(tags, name: str) -> float:
    """A TIFF resolution tag (a rational) as a number."""
    numerator, denominator = tags[name].value
    return numerator / denominator


def test_plain_tiffs_are_calibrated_for_fiji(tmp_path):
    images = write_real_result(tmp_path / "v.h5", shape=(2, 24, 32))
    calibrate(tmp_path / "v.h5", (0.04, 0.005, 0.004))
    run_export(tmp_path / "v.h5", "--format", "tiff")
    with tifffile.TiffFile(tmp_path / "v_export" / "v_mean_z001.tif") as tif:
        tags = tif.pages[0].tags
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
        assert resolution(tags, "XResolution") == pytest.approx(1 / 0.004)   # pixels per µm
        assert resolution(tags, "YResolution") == pytest.approx(1 / 0.005)
        np.testing.assert_array_equal(tif.asarray(), images["mean"][1])


def test_uncalibrated_result_gives_plain_tiffs(tmp_path):
    write_real_result(tmp_path / "r.h5")
    run_export(tmp_path / "r.h5", "--format", "tiff")
    with tifffile.TiffFile(tmp_path / "r_export" / "r_mean.tif") as tif:
        assert not tif.is_imagej and tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE


@pytest.mark.parametrize("size", [(0.0, 0.1), (np.nan, 0.1), (0.1,), (-1.0, 0.1, 0.1)])
def test_malformed_pixel_size_is_ignored(tmp_path, size):
    write_real_result(tmp_path / "r.h5")
    calibrate(tmp_path / "r.h5", size)
    run_export(tmp_path / "r.h5", "--format", "tiff,ome-tiff")
    assert not tifffile.TiffFile(tmp_path / "r_export" / "r_mean.tif").is_imagej
    assert ome_pixels(tmp_path / "r_export" / "r_mean.ome.tif")[1].get("PhysicalSizeX") is None


def test_bigtiff_calibration_uses_standard_centimetre_tags(tmp_path):
    options = export.tiff_calibration((0.005, 0.004), bigtiff=True)
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 4), np.float32), bigtiff=True, **options)
    with tifffile.TiffFile(tmp_path / "b.tif") as tif:
        tags = tif.pages[0].tags
        assert tif.is_bigtiff and not tif.is_imagej
        assert tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert resolution(tags, "XResolution") == pytest.approx(1e4 / 0.004)   # pixels per cm
        assert resolution(tags, "YResolution") == pytest.approx(1e4 / 0.005)
    assert export.tiff_calibration(None, bigtiff=False) == {}


@pytest.mark.parametrize("value, expected", [("both", {"tiff", "png"}), ("png,ome-tiff", {"png", "ome-tiff"}),
                                             (" tiff , both", {"tiff", "png"})])
def test_format_list(value, expected):
    assert export._formats(value) == expected


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    write_result(tmp_path / "r.h5")
    with pytest.raises(SystemExit) as info:
        run_export(tmp_path / "r.h5", "--format", "png,jpeg")
    assert info.value.code == 2 and "'jpeg'" in capsys.readouterr().err
