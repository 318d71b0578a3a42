"""Tests of the ``export`` subcommand: files written, their values, naming, refusals."""
import argparse
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from hpc_zsem import enhance, export
from hpc_zsem.errors import ConfigError, InputError, OutputError


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
