"""Reading one plane of an input image through the package's reader (``open_source(...).read_section()``, via
``conftest.read_plane``): crops, stacks, and refusing unusable inputs with a one-line InputError naming the
file. And hpc_zsem.io.images: input paths and checksums."""
import hashlib

import numpy as np
import pytest
import tifffile

from conftest import read_plane
from hpc_zsem.errors import InputError
from hpc_zsem.io.images import DEMO_NOISY, file_checksum, resolve_input_path
from hpc_zsem.io.regions import open_source


@pytest.fixture
def image():
    return np.arange(40 * 30, dtype=np.uint16).reshape(40, 30)


def write(path, array):
    tifffile.imwrite(path, np.asarray(array), compression="zlib")


def refused(path, match, **kwargs):
    with pytest.raises(InputError, match=match) as info:
        read_plane(path, **kwargs)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_read_2d(tmp_path, image):
    path = tmp_path / "a.tif"
    write(path, image)
    out = read_plane(path)
    assert out.dtype == np.float64 and np.array_equal(out, image)
    with open_source(path) as src:      # the shape comes from the headers
        assert src.shape == src.plane_shape == (40, 30) and src.n_sections == 1
    assert np.array_equal(read_plane(path, section=0), image)
    refused(path, r"section 1 out of range; the file is a single 2-D image \(section 0\)", section=1)


def test_crop_and_downsample_equal_slicing(tmp_path, image):
    path = tmp_path / "a.tif"
    write(path, image)
    out = read_plane(path, crop=(3, 37, 5, 29), downsample=3)
    assert np.array_equal(out, image[3:37, 5:29][::3, ::3])
    with open_source(path, crop=(3, 37, 5, 29), downsample=3) as src:
        assert src.plane_shape == out.shape


def test_crop_outside_image(tmp_path, image):
    path = tmp_path / "a.tif"
    write(path, image)
    refused(path, r"shape \(Y, X\) = \(40, 30\)", crop=(0, 41, 0, 10))


def test_stack_needs_section_and_section_picks_page(tmp_path):
    """Without a section a stack is the whole volume (Z, Y, X); one plane of it needs a section in range."""
    stack = np.random.default_rng(0).random((5, 12, 9)).astype(np.float32)
    path = tmp_path / "stack.tif"
    write(path, stack)
    with open_source(path) as src:
        assert src.shape == (5, 12, 9) and src.n_sections == 5
    with pytest.raises(ValueError, match="stack of 5 sections; pass section="):
        read_plane(path)
    assert np.array_equal(read_plane(path, section=3), stack[3])
    with open_source(path, section=4) as src:
        assert src.shape == src.plane_shape == (12, 9) and src.n_sections == 1
    refused(path, r"section 5 out of range; the file is a stack of 5 sections \(0..4\)", section=5)


def test_multipage_appended_file(tmp_path, image):
    path = tmp_path / "pages.tif"
    for k in range(3):
        tifffile.imwrite(path, image + k, append=True, metadata=None)
    assert np.array_equal(read_plane(path, section=2), image + 2)


def test_rgb_refused(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    refused(path, r"colour image \(RGB\); convert to grayscale")


def test_nan_refused_with_count(tmp_path):
    data = np.ones((6, 6), np.float32)
    data[1, 2] = np.nan
    data[4, 4] = np.inf
    path = tmp_path / "nan.tif"
    write(path, data)
    refused(path, "2 pixels are NaN or Inf")
    assert read_plane(path, crop=(0, 1, 0, 6)).shape == (1, 6)


def test_unsupported_dtype(tmp_path):
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.complex64))
    refused(path, "pixel type complex64")


def test_truncated_file(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.random.default_rng(1).integers(0, 2**16, (64, 64), dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path, "cannot read")


def test_garbage_and_missing(tmp_path):
    path = tmp_path / "junk.tif"
    path.write_bytes(b"not a tiff at all")
    refused(path, "cannot read as TIFF")
    refused(tmp_path / "missing.tif", "no such file")


def test_checksum_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    payload = np.random.default_rng(2).bytes(3 * 2**20 + 17)
    path.write_bytes(payload)
    assert file_checksum(path) == "sha256:" + hashlib.sha256(payload).hexdigest()


def test_demo_path():
    assert resolve_input_path(DEMO_NOISY).name == "demo_noisy.tif"
    assert resolve_input_path("x/y.tif").as_posix() == "x/y.tif"
    assert read_plane(DEMO_NOISY).ndim == 2
