"""Display enhancement of result images: pure array functions, no files.

* Contrast stretch: the ``low_pct`` and ``high_pct`` percentiles of the finite pixels are mapped linearly to
  0 and 1, values outside are clipped, then a gamma is applied as ``x ** (1 / gamma)``: **gamma > 1
  brightens** the mid-tones, gamma < 1 darkens them, gamma = 1 keeps the stretch linear. NaN maps to 0,
  +inf to 1, -inf to 0; an image whose two percentiles coincide (e.g. a constant one) maps to 0.
* Quantisation of [0, 1] floats to 8 or 16 bits (``round(x * max)``).
* Colour maps as 256×3 uint8 look-up tables: "gray", and "viridis", "magma", "inferno" rebuilt from 17
  control points sampled from matplotlib's 256-entry tables (entries 0, 16, …, 240, 255) and interpolated
  linearly per channel — visually indistinguishable from the originals, without a matplotlib dependency.
* Two-tone colouring (the paper's Fig. 1): brightness from the contrast-enhanced variance image, hue from a
  mask — masked pixels in one colour (cells: blue), the others in another (yellow).
* Panels (the paper's Fig. 2): images side by side, each under a title strip; a title wider than its image
  is set in a smaller font (down to 7 px where Pillow has FreeType), then abbreviated, so titles never
  reach into the neighbouring column. :func:`panel_canvas` gives the empty panel and where each image goes.

Bounded memory: :func:`stretch`, :func:`apply_colormap` and :func:`two_tone` take ``out=`` to write into a
given array (the input itself, or a band of a larger image) and keep their temporaries to about one float32
plane of their input, so a caller can render a large image band by band (see :mod:`hpc_zsem.export`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLUE = (0, 90, 255)
YELLOW = (255, 200, 0)

_CONTROL_INDICES = (0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 255)

# RGB in [0, 1] at _CONTROL_INDICES, copied from matplotlib's _cm_listed.py (CC0, Smith & van der Walt).
_CONTROL_POINTS = {
    "viridis": (
        (0.267004, 0.004874, 0.329415), (0.282327, 0.094955, 0.417331), (0.278826, 0.175490, 0.483397),
        (0.258965, 0.251537, 0.524736), (0.229739, 0.322361, 0.545706), (0.199430, 0.387607, 0.554642),
        (0.172719, 0.448791, 0.557885), (0.149039, 0.508051, 0.557250), (0.127568, 0.566949, 0.550556),
        (0.120638, 0.625828, 0.533488), (0.157851, 0.683765, 0.501686), (0.246070, 0.738910, 0.452024),
        (0.369214, 0.788888, 0.382914), (0.515992, 0.831158, 0.294279), (0.678489, 0.863742, 0.189503),
        (0.845561, 0.887322, 0.099702), (0.993248, 0.906157, 0.143936),
    ),
    "magma": (
        (0.001462, 0.000466, 0.013866), (0.039608, 0.031090, 0.133515), (0.113094, 0.065492, 0.276784),
        (0.211718, 0.061992, 0.418647), (0.316654, 0.071690, 0.485380), (0.414709, 0.110431, 0.504662),
        (0.512831, 0.148179, 0.507648), (0.613617, 0.181811, 0.498536), (0.716387, 0.214982, 0.475290),
        (0.816914, 0.255895, 0.436461), (0.904281, 0.319610, 0.388137), (0.960949, 0.418323, 0.359630),
        (0.986700, 0.535582, 0.382210), (0.996096, 0.653659, 0.446213), (0.996898, 0.769591, 0.534892),
        (0.992440, 0.884330, 0.640099), (0.987053, 0.991438, 0.749504),
    ),
    "inferno": (
        (0.001462, 0.000466, 0.013866), (0.042253, 0.028139, 0.141141), (0.129285, 0.047293, 0.290788),
        (0.238273, 0.036621, 0.396353), (0.341500, 0.062325, 0.429425), (0.441207, 0.099338, 0.431594),
        (0.540920, 0.134729, 0.415123), (0.640135, 0.171438, 0.381065), (0.735683, 0.215906, 0.330245),
        (0.822386, 0.275197, 0.266085), (0.894305, 0.353399, 0.193584), (0.946965, 0.449191, 0.115272),
        (0.978422, 0.557937, 0.034931), (0.987874, 0.675267, 0.065257), (0.974638, 0.797692, 0.206332),
        (0.947594, 0.917399, 0.410665), (0.988362, 0.998364, 0.644924),
    ),
}

COLORMAPS = ("gray",) + tuple(_CONTROL_POINTS)


def stretch_limits(img: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """The ``low_pct`` and ``high_pct`` percentiles of the finite pixels of ``img`` ((0, 0) if none is finite)."""
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct} and {high_pct}")
    values = np.asarray(img)
    finite = values[np.isfinite(values)]   # a copy, so the percentiles may partition it in place
    if finite.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(finite, [low_pct, high_pct], overwrite_input=True)
    return float(lo), float(hi)


def stretch(img: np.ndarray, lo: float, hi: float, gamma: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Map ``lo`` to 0 and ``hi`` to 1 linearly, clip to [0, 1], then apply ``x ** (1 / gamma)`` (float32).

    gamma > 1 brightens the mid-tones; NaN and -inf map to 0, +inf to 1; ``hi <= lo`` gives all zeros. The
    result is written into ``out`` (a float32 array of the image's shape, which may be ``img`` itself, to
    stretch in place) if given, else into a new array.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    values = np.asarray(img, dtype=np.float32)
    x = np.empty(values.shape, dtype=np.float32) if out is None else out
    if hi <= lo:
        x[...] = 0.0
        return x
    np.subtract(values, lo, out=x)   # every step works in x: no temporary of the image's size
    x /= hi - lo
    np.clip(x, 0.0, 1.0, out=x)   # +inf → 1, -inf → 0; NaN stays NaN ...
    np.copyto(x, 0.0, where=np.isnan(x))   # ... and becomes 0
    return x if gamma == 1.0 else np.power(x, 1.0 / gamma, out=x)


def contrast_stretch(img: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                     gamma: float = 1.0) -> np.ndarray:
    """Percentile contrast stretch of ``img`` to [0, 1] (float32): see :func:`stretch_limits` and :func:`stretch`."""
    return stretch(img, *stretch_limits(img, low_pct, high_pct), gamma=gamma)


def _quantize(x01: np.ndarray, dtype: type) -> np.ndarray:
    """Round ``x01`` (clipped to [0, 1]) onto the full range of the unsigned integer ``dtype``."""
    x = np.clip(x01, 0.0, 1.0)   # the only float temporary: scaled and rounded in place
    x *= np.iinfo(dtype).max
    np.rint(x, out=x)
    return x.astype(dtype)


def to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 0..255 (values outside [0, 1] are clipped)."""
    return _quantize(x01, np.uint8)


def to_uint16(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint16 0..65535 (values outside [0, 1] are clipped)."""
    return _quantize(x01, np.uint16)


@lru_cache(maxsize=None)
def colormap_lut(name: str) -> np.ndarray:
    """The read-only 256×3 uint8 look-up table of the colour map ``name`` (one of :data:`COLORMAPS`)."""
    if name == "gray":
        lut = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    elif name in _CONTROL_POINTS:
        points = np.asarray(_CONTROL_POINTS[name])
        levels = np.arange(256)
        channels = [np.interp(levels, _CONTROL_INDICES, points[:, c]) for c in range(3)]
        lut = to_uint8(np.stack(channels, axis=1))
    else:
        raise ValueError(f"unknown colour map {name!r}; expected one of {', '.join(COLORMAPS)}")
    lut.flags.writeable = False
    return lut


def apply_colormap(x01: np.ndarray, name: str = "gray", out: np.ndarray | None = None) -> np.ndarray:
    """Colour a [0, 1] image with the colour map ``name``: shape (..., 3) uint8, written into ``out`` if given
    (e.g. a band of a larger image, so no coloured copy is made)."""
    lut, index = colormap_lut(name), to_uint8(x01)
    if out is None:
        out = np.empty(index.shape + (3,), dtype=np.uint8)
    for channel in range(3):   # per channel: no (..., 3) temporary, no index array widened to intp
        out[..., channel] = lut[:, channel][index]
    return out


def threshold_mask(img: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the pixels of ``img`` strictly above ``threshold`` (NaN is outside)."""
    return np.asarray(img) > threshold


def two_tone(variance01: np.ndarray, mask: np.ndarray, inside: Sequence[int] = BLUE,
             outside: Sequence[int] = YELLOW, out: np.ndarray | None = None) -> np.ndarray:
    """Two-tone rendering (Y, X, 3) uint8: pixel = brightness × colour, written into ``out`` if given.

    ``variance01`` is the contrast-enhanced variance image in [0, 1] (the brightness; values outside are
    clipped, NaN is black); ``mask`` (nonzero = inside, same shape) picks the colour: ``inside`` for masked
    pixels, ``outside`` for the rest.
    """
    brightness = np.asarray(variance01, dtype=np.float32)
    if brightness.size and not (brightness.min() >= 0.0 and brightness.max() <= 1.0):   # NaN fails too
        brightness = np.clip(brightness, 0.0, 1.0)
        np.copyto(brightness, 0.0, where=np.isnan(brightness))
    inner = np.asarray(mask) != 0
    if inner.shape != brightness.shape:
        raise ValueError(f"mask shape {inner.shape} does not match image shape {brightness.shape}")
    if out is None:
        out = np.empty(brightness.shape + (3,), dtype=np.uint8)
    for channel, (a, b) in enumerate(zip(inside, outside)):   # per channel: float temporaries of one plane
        value = np.where(inner, np.float32(a), np.float32(b))
        value *= brightness
        out[..., channel] = np.rint(value, out=value)
    return out


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """A 2-D uint8 image repeated into three channels, or an (Y, X, 3) uint8 image unchanged."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"panel images must be uint8 (Y, X) or (Y, X, 3), got {img.dtype} {img.shape}")
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)


MIN_TITLE_SIZE = 7


@lru_cache(maxsize=None)
def _title_fonts() -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, ...]:
    """Pillow's default font, followed by smaller sizes of it down to :data:`MIN_TITLE_SIZE` where FreeType is
    available (Pillow >= 10.1); only the default font otherwise."""
    default = ImageFont.load_default()
    size = getattr(default, "size", None)
    if size is None:
        return (default,)
    return (default,) + tuple(ImageFont.load_default(size=s) for s in range(int(size) - 1, MIN_TITLE_SIZE - 1, -1))


def _abbreviations(title: str) -> list[str]:
    """``title``, then shorter forms: leading words ("mean (denoised)" → "mean"), then leading letters of the
    first word with a dot ("variance" → "varian.", …, "v."), then the empty string."""
    words = title.split()
    shorter = [" ".join(words[:k]) for k in range(len(words) - 1, 0, -1)]
    first = words[0] if words else ""
    return [title, *shorter, *(first[:k] + "." for k in range(len(first) - 1, 0, -1)), ""]


def fit_title(title: str, width: int) -> tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """The longest form of ``title`` (see :func:`_abbreviations`) in the largest title font whose drawn text is
    at most ``width`` pixels wide: whole titles in a smaller font are preferred over abbreviations."""
    fonts = _title_fonts()
    for text in _abbreviations(title):
        for font in fonts:
            if font.getbbox(text)[2] <= width:
                return text, font
    return "", fonts[-1]


def panel_canvas(tiles: Sequence[tuple[str, tuple[int, int]]], pad: int = 8,
                 background: Sequence[int] = (255, 255, 255), text: Sequence[int] = (0, 0, 0),
                 ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The empty panel for images of the given (height, width), titles drawn: ``(canvas, origins)``.

    ``tiles`` is a list of (title, (height, width)); ``canvas`` is the (H, W, 3) uint8 panel filled with
    ``background`` and ``origins`` the (y, x) of each image's top-left corner in it, so a caller can paint the
    images in place (band by band) instead of holding them all. Layout as in :func:`panel`.
    """
    if not tiles:
        raise ValueError("panel needs at least one image")
    title_height = math.ceil(_title_fonts()[0].getbbox("Ag")[3]) + pad   # Pillow types the box as floats
    width = sum(w for _, (_, w) in tiles) + pad * (len(tiles) + 1)
    height = 2 * pad + title_height + max(h for _, (h, _) in tiles)
    strip = Image.new("RGB", (width, pad + title_height), tuple(background))
    draw = ImageDraw.Draw(strip)
    origins, x = [], pad
    for title, (_, w) in tiles:
        label, font = fit_title(title, w)
        draw.text((x, pad), label, fill=tuple(text), font=font)
        origins.append((pad + title_height, x))
        x += w + pad
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = np.asarray(background, dtype=np.uint8)
    canvas[:strip.height] = np.asarray(strip)
    return canvas, origins


def panel(images: Sequence[tuple[str, np.ndarray]], pad: int = 8, background: Sequence[int] = (255, 255, 255),
          text: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Images side by side, top-aligned, each under its title (Pillow's default font): (H, W, 3) uint8.

    ``images`` is a list of (title, uint8 image 2-D or RGB). ``pad`` pixels of background separate the images
    and surround the panel, so W = Σ widths + (n + 1)·pad and H = pad + title strip + max height + pad. Each
    title is fitted into the width of its image (:func:`fit_title`), so titles never overlap.
    """
    tiles = [_as_rgb(img) for _, img in images]
    canvas, origins = panel_canvas([(title, tile.shape[:2]) for (title, _), tile in zip(images, tiles)], pad,
                                   background, text)
    for (y, x), tile in zip(origins, tiles):
        canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return canvas
