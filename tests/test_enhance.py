"""Tests of hpc_zsem.enhance: contrast stretch, quantisation, colour maps, two-tone colouring, panels."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hpc_zsem import enhance


def test_contrast_stretch_maps_percentiles_to_0_and_1():
    img = np.random.default_rng(0).normal(size=(40, 50)).astype(np.float32)
    lo, hi = np.percentile(img, [2.0, 98.0])
    x = enhance.contrast_stretch(img, 2.0, 98.0)
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.all(x[img <= lo] == 0.0) and np.all(x[img >= hi] == 1.0)


def test_contrast_stretch_ignores_non_finite_pixels():
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    with_nan = img.copy()
    with_nan[0, :3] = [np.nan, np.inf, -np.inf]
    assert enhance.stretch_limits(with_nan, 0, 100) == (3.0, 99.0)
    x = enhance.contrast_stretch(with_nan, 0, 100)
    assert x[0, :3].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("img", [np.full((5, 6), 7.0), np.full((3, 3), np.nan)])
def test_constant_or_empty_image_maps_to_zero(img):
    with np.errstate(all="raise"):
        assert np.all(enhance.contrast_stretch(img) == 0.0)


def test_gamma_above_one_brightens():
    img = np.linspace(0, 1, 101)
    linear = enhance.contrast_stretch(img, 0, 100)
    bright = enhance.contrast_stretch(img, 0, 100, gamma=2.0)
    np.testing.assert_allclose(bright, np.sqrt(linear), rtol=1e-6)
    assert np.all(bright[1:-1] > linear[1:-1])


@pytest.mark.parametrize("low, high, gamma", [(50, 50, 1.0), (-1, 50, 1.0), (0, 101, 1.0), (0, 100, 0.0)])
def test_invalid_stretch_parameters(low, high, gamma):
    with pytest.raises(ValueError):
        enhance.contrast_stretch(np.arange(4.0), low, high, gamma)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)),
              elements=st.floats(-1e6, 1e6, width=32)))
def test_stretch_output_is_in_unit_interval(img):
    x = enhance.contrast_stretch(img)
    assert x.dtype == np.float32 and x.shape == img.shape
    assert np.all((x >= 0) & (x <= 1))


def test_quantisation_endpoints_and_clipping():
    x = np.array([-0.5, 0.0, 0.5, 1.0, 2.0])
    assert enhance.to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    assert enhance.to_uint16(x).tolist() == [0, 0, 32768, 65535, 65535]
    assert enhance.to_uint8(x).dtype == np.uint8 and enhance.to_uint16(x).dtype == np.uint16


@pytest.mark.parametrize("name", enhance.COLORMAPS)
def test_colormap_luts(name):
    lut = enhance.colormap_lut(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8 and not lut.flags.writeable
    luminance = lut.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(luminance) > -1.0)  # perceptually ordered maps: brightness never drops


def test_colormap_known_values():
    assert enhance.colormap_lut("viridis")[[0, 255]].tolist() == [[68, 1, 84], [253, 231, 37]]
    assert enhance.colormap_lut("gray")[[0, 100, 255]].tolist() == [[0, 0, 0], [100, 100, 100], [255] * 3]


def test_apply_colormap_shape_and_unknown_name():
    x = np.linspace(0, 1, 12).reshape(3, 4)
    rgb = enhance.apply_colormap(x, "magma")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[-1, -1], enhance.colormap_lut("magma")[255])
    with pytest.raises(ValueError, match="jet"):
        enhance.apply_colormap(x, "jet")


def test_two_tone_colours_exactly_the_masked_pixels():
    rng = np.random.default_rng(1)
    brightness = rng.uniform(0.2, 1.0, size=(30, 40))
    mask = rng.random((30, 40)) < 0.3
    out = enhance.two_tone(brightness, mask)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8

    def direction(rgb):
        rgb = np.asarray(rgb, dtype=float)
        return rgb / np.linalg.norm(rgb, axis=-1, keepdims=True)

    np.testing.assert_allclose(direction(out[mask]), np.broadcast_to(direction(enhance.BLUE), (mask.sum(), 3)),
                               atol=0.02)
    np.testing.assert_allclose(direction(out[~mask]),
                               np.broadcast_to(direction(enhance.YELLOW), ((~mask).sum(), 3)), atol=0.02)
    expected = np.where(mask[..., None], enhance.BLUE, enhance.YELLOW) * brightness[..., None]
    np.testing.assert_array_equal(out, np.round(expected).astype(np.uint8))


def test_two_tone_with_threshold_mask_and_custom_colours():
    img = np.array([[0.0, 1.0], [2.0, 3.0]])
    mask = enhance.threshold_mask(img, 1.5)
    out = enhance.two_tone(np.ones((2, 2)), mask, inside=(255, 0, 0), outside=(0, 255, 0))
    assert out.reshape(4, 3).tolist() == [[0, 255, 0], [0, 255, 0], [255, 0, 0], [255, 0, 0]]


def test_two_tone_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask shape"):
        enhance.two_tone(np.ones((4, 4)), np.ones((4, 5), bool))


def test_panel_size_and_layout():
    grey = np.full((20, 30), 7, np.uint8)
    rgb = np.zeros((25, 10, 3), np.uint8)
    rgb[..., 0] = 200
    out = enhance.panel([("noisy", grey), ("mean", rgb)], pad=8)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] == 30 + 10 + 3 * 8
    top = out.shape[0] - 8 - 25  # images sit at the bottom of the panel, above the lower pad
    np.testing.assert_array_equal(out[top:top + 20, 8:38], 7)
    np.testing.assert_array_equal(out[top:top + 25, 46:56], rgb)
    assert np.any(out[:top, 8:38] < 128)  # some (anti-aliased) title text is drawn


def test_panel_rejects_bad_input():
    with pytest.raises(ValueError):
        enhance.panel([])
    with pytest.raises(ValueError, match="uint8"):
        enhance.panel([("float", np.zeros((4, 4)))])


@pytest.mark.parametrize("width", [0, 3, 10, 24, 40, 64, 200])
def test_fit_title_fits_the_width(width):
    for title in ("noisy input", "mean (denoised)", "variance"):
        text, font = enhance.fit_title(title, width)
        assert font.getbbox(text)[2] <= width
        assert title.startswith(text.rstrip("."))
    assert enhance.fit_title("mean (denoised)", 200)[0] == "mean (denoised)"


def test_fit_title_drops_words_before_letters():
    assert enhance.fit_title("mean (denoised)", 30)[0] == "mean"
    assert enhance.fit_title("x", 0)[0] == ""


def test_fit_title_without_freetype_abbreviates_in_the_bitmap_font(monkeypatch):
    bitmap = getattr(enhance.ImageFont, "load_default_imagefont", enhance.ImageFont.load_default)  # Pillow < 10.1
    monkeypatch.setattr(enhance.ImageFont, "load_default", bitmap)
    enhance._title_fonts.cache_clear()
    try:
        assert len(enhance._title_fonts()) == 1
        text, font = enhance.fit_title("mean (denoised)", 64)
        assert text == "mean" and font.getbbox(text)[2] <= 64
    finally:
        enhance._title_fonts.cache_clear()


def test_panel_titles_stay_above_their_own_images():
    widths = [64, 24, 10, 40]
    titles = ["noisy input", "mean (denoised)", "variance", "a rather long title"]
    images = [(title, np.zeros((20, w), np.uint8)) for title, w in zip(titles, widths)]
    out = enhance.panel(images, pad=8)
    strip = out[:out.shape[0] - 8 - 20]
    ink = np.flatnonzero((strip != 255).any(axis=(0, 2)))
    starts = 8 + np.concatenate([[0], np.cumsum(np.asarray(widths[:-1]) + 8)])
    inside = np.zeros(out.shape[1], bool)
    for start, w in zip(starts, widths):
        inside[start:start + w] = True
    assert len(ink) and inside[ink].all()


def test_stretch_in_place_matches_a_new_array():
    img = np.random.default_rng(4).normal(size=(6, 7)).astype(np.float32)
    img[0, :3] = [np.nan, np.inf, -np.inf]
    expected = enhance.stretch(img, -1.0, 1.0, gamma=2.0)
    band = img.copy()
    assert enhance.stretch(band, -1.0, 1.0, gamma=2.0, out=band) is band
    np.testing.assert_array_equal(band, expected)
    assert expected[0, :3].tolist() == [0.0, 1.0, 0.0]
    np.testing.assert_array_equal(enhance.stretch(img, 1.0, 1.0, out=band), 0.0)


def test_colour_and_two_tone_into_a_view_of_a_larger_image():
    x = np.linspace(0, 1, 20).reshape(4, 5)
    mask = x > 0.5
    canvas = np.zeros((10, 12, 3), np.uint8)
    enhance.apply_colormap(x, "viridis", out=canvas[1:5, 2:7])
    np.testing.assert_array_equal(canvas[1:5, 2:7], enhance.colormap_lut("viridis")[enhance.to_uint8(x)])
    enhance.two_tone(x, mask, out=canvas[5:9, 0:5])
    np.testing.assert_array_equal(canvas[5:9, 0:5], enhance.two_tone(x, mask))
    assert not canvas[:, 7:].any()   # nothing written outside the views


def test_two_tone_clips_brightness_outside_the_unit_interval():
    out = enhance.two_tone(np.array([[-0.5, 2.0, np.nan]]), np.array([[1, 1, 0]]))
    assert out.tolist() == [[[0, 0, 0], list(enhance.BLUE), [0, 0, 0]]]


def test_panel_canvas_origins_are_where_panel_puts_the_images():
    shapes = [(20, 30), (25, 10)]
    canvas, origins = enhance.panel_canvas([("noisy", shapes[0]), ("mean", shapes[1])])
    assert origins == [(canvas.shape[0] - 8 - 25, 8), (canvas.shape[0] - 8 - 25, 46)]
    images = [("noisy", np.full(shapes[0], 7, np.uint8)), ("mean", np.full(shapes[1], 9, np.uint8))]
    for (y, x), (_, image) in zip(origins, images):
        canvas[y:y + image.shape[0], x:x + image.shape[1]] = image[..., None]
    np.testing.assert_array_equal(canvas, enhance.panel(images))
