"""Lazy region reading: only the needed TIFF tiles/strips are decoded; stacks, OME pyramids, HDF5."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile

from hpc_zsem.errors import InputError
from hpc_zsem.io.regions import ome_pixel_size_um, open_source, pixel_size_um, split_h5_path


def _image(shape, seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype(dtype)


def _tiles_of(y0, y1, x0, x1, t=256):
    return len(range(y0 // t, (y1 - 1) // t + 1)) * len(range(x0 // t, (x1 - 1) // t + 1))


def test_tiled_bigtiff_written_on_the_fly_reads_only_needed_tiles(tmp_path):
    size, t = 2048, 256
    path = tmp_path / "mosaic.tif"

    def tiles():
        for ty in range(0, size, t):
            for tx in range(0, size, t):
                yy, xx = np.mgrid[ty:ty + t, tx:tx + t]
                yield ((yy * 7 + xx * 3) % 65521).astype(np.uint16)

    tifffile.imwrite(path, data=tiles(), shape=(size, size), dtype=np.uint16, tile=(t, t), bigtiff=True,
                     compression="zlib")
    yy, xx = np.mgrid[0:size, 0:size]
    truth = ((yy * 7 + xx * 3) % 65521).astype(np.float64)
    n_tiles = (size // t) ** 2
    with open_source(path) as src:
        assert src.shape == (size, size) and src.ndim == 2 and src.dtype == np.uint16
        for box in [(300, 700, 1000, 1100), (0, 1, 0, 1), (255, 257, 255, 257), (1800, 2048, 0, 2048)]:
            src.reset_stats()
            region = src.read(0, *box)
            assert region.dtype == np.float64
            np.testing.assert_array_equal(region, truth[box[0]:box[1], box[2]:box[3]])
            expected = _tiles_of(*box)
            assert src.stats["segments_decoded"] <= expected
            assert src.stats["pixels_decoded"] <= expected * t * t < size * size
        # a region that was just decoded comes from the cache; nothing new is decoded
        src.reset_stats()
        src.read(None, 1800, 1900, 0, 100)
        assert src.stats["segments_decoded"] == 0
        # total decoded over the whole test never exceeded the tiles touched (and not the whole image)
    with open_source(path, crop=(256, 768, 512, 1024), downsample=2) as src:
        assert src.shape == (256, 256)
        src.reset_stats()
        np.testing.assert_array_equal(src.read(0, 0, 256, 0, 256), truth[256:768:2, 512:1024:2])
        assert src.stats["segments_decoded"] == 4 < n_tiles


def test_striped_tiff_reads_only_needed_strips(tmp_path):
    image = _image((500, 300))
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, rowsperstrip=16, compression="zlib")
    with open_source(path) as src:
        region = src.read(0, 100, 140, 10, 290)
        np.testing.assert_array_equal(region, image[100:140, 10:290])
        assert src.stats["segments_decoded"] == len(range(100 // 16, 139 // 16 + 1))
        np.testing.assert_array_equal(src.read_section(), image)


def test_jpeg_tiles_with_shared_tables(tmp_path):
    """JPEG tiles (the tables shared in JPEGTables) decode through tifffile's zarr store as tifffile decodes
    them, tile by tile (needs imagecodecs, as tifffile's JPEG codec does)."""
    pytest.importorskip("imagecodecs")
    image = _image((300, 260), seed=9, dtype=np.uint8)
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="jpeg", photometric="minisblack")
    truth = tifffile.imread(path)
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read(0, 70, 140, 10, 200), truth[70:140, 10:200])
        assert src.stats["segments_decoded"] == _tiles_of(70, 140, 10, 200, 64)
        np.testing.assert_array_equal(src.read_section(), truth)


def test_multipage_stack_sections(tmp_path):
    stack = _image((3, 300, 200), seed=1)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", tile=(64, 64), compression="zlib")
    with open_source(path) as src:
        assert src.shape == (3, 300, 200) and src.n_sections == 3
        for z in range(3):
            src.reset_stats()
            np.testing.assert_array_equal(src.read(z, 50, 120, 70, 130), stack[z, 50:120, 70:130])
            assert src.stats["segments_decoded"] == _tiles_of(50, 120, 70, 130, 64)
    with open_source(path, section=2) as src:
        assert src.shape == (300, 200)
        np.testing.assert_array_equal(src.read(0, 0, 10, 0, 10), stack[2, :10, :10])
    with pytest.raises(InputError, match="section 3 out of range"):
        open_source(path, section=3)


def test_imagej_stack_and_pixel_size(tmp_path):
    stack = _image((3, 64, 80), seed=2, dtype=np.uint8)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 0.005, 1 / 0.004),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 0.05})
    with open_source(path) as src:
        assert src.shape == (3, 64, 80)
        np.testing.assert_array_equal(src.read(1, 5, 20, 30, 70), stack[1, 5:20, 30:70])
    size = pixel_size_um(path)
    assert size is not None and np.allclose(size, (0.05, 0.004, 0.005))


def test_volumetric_tiff(tmp_path):
    vol = _image((4, 100, 90), seed=3)
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, vol, tile=(2, 32, 32), volumetric=True, photometric="minisblack")
    with open_source(path) as src:
        assert src.shape == (4, 100, 90)
        for z in range(4):
            np.testing.assert_array_equal(src.read(z, 10, 70, 20, 50), vol[z, 10:70, 20:50])


def test_pyramidal_ome_tiff_full_resolution(tmp_path):
    image = _image((512, 384), seed=4)
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(image, subifds=2, tile=(128, 128), metadata={"axes": "YX", "PhysicalSizeX": 0.01,
                                                               "PhysicalSizeY": 0.01})
        tif.write(image[::2, ::2], subfiletype=1, tile=(128, 128))
        tif.write(image[::4, ::4], subfiletype=1, tile=(128, 128))
    with open_source(path) as src:
        assert src.shape == (512, 384)
        src.reset_stats()
        np.testing.assert_array_equal(src.read(0, 100, 250, 0, 100), image[100:250, :100])
        assert src.stats["segments_decoded"] == 2
    assert np.allclose(pixel_size_um(path), (0.01, 0.01))


def test_hdf5_dataset_2d_and_3d(tmp_path):
    path = tmp_path / "data.h5"
    vol = _image((3, 120, 100), seed=5).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("em/volume", data=vol, chunks=(1, 32, 32))
        f.create_dataset("em/plane", data=vol[0])
        f["em/volume"].attrs["element_size_um"] = [0.05, 0.005, 0.005]
    with open_source(f"{path}:/em/volume") as src:
        assert src.shape == (3, 120, 100)
        for z in range(3):
            np.testing.assert_array_equal(src.read(z, 7, 40, 60, 99), vol[z, 7:40, 60:99])
    with open_source(f"{path}:/em/volume", section=1) as src:
        np.testing.assert_array_equal(src.read_section(), vol[1])
    with open_source(f"{path}:em/plane") as src:
        assert src.shape == (120, 100)
    assert pixel_size_um(f"{path}:/em/volume") == pytest.approx((0.05, 0.005, 0.005))
    assert split_h5_path("a/b.hdf5:/x/y") == (tmp_path.__class__("a/b.hdf5"), "/x/y")
    assert split_h5_path("a/b.tif") is None
    with pytest.raises(InputError, match="name the dataset"):
        open_source(str(path))
    with pytest.raises(InputError, match="no dataset"):
        open_source(f"{path}:/nope")


def test_input_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.tif: no such file"):
        open_source(tmp_path / "missing.tif")
    with pytest.raises(InputError, match="missing.h5: no such file"):
        open_source(f"{tmp_path}/missing.h5:/x")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="rgb.tif: colour image"):
        open_source(rgb)
    cplx = tmp_path / "complex.h5"
    with h5py.File(cplx, "w") as f:
        f["x"] = np.zeros((8, 8), np.complex64)
    with pytest.raises(InputError, match="pixel type complex64"):
        open_source(f"{cplx}:/x")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(InputError, match="junk.tif: cannot read as TIFF"):
        open_source(junk)
    nan = tmp_path / "nan.tif"
    image = np.zeros((300, 300), np.float32)
    image[280, 290] = np.nan
    tifffile.imwrite(nan, image, tile=(128, 128))
    with open_source(nan) as src:
        src.read(0, 0, 100, 0, 100)   # a finite region is fine
        with pytest.raises(InputError, match="nan.tif: 1 pixels are NaN or Inf"):
            src.read(0, 256, 300, 256, 300)
    with pytest.raises(InputError, match="crop"):
        open_source(nan, crop=(0, 400, 0, 10))


def test_truncated_tiff_is_a_clean_input_error(tmp_path):
    path = tmp_path / "trunc.tif"
    image = _image((512, 512), seed=6)
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        last = tif.pages[0].dataoffsets[-1]
    # corrupt the last tile's compressed bytes
    path.write_bytes(data[:last] + b"\x00" * (len(data) - last))
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read(0, 0, 10, 0, 10), image[:10, :10])
        with pytest.raises(InputError, match="trunc.tif: cannot read pixel data"):
            src.read(0, 500, 512, 500, 512)


def test_contiguous_series_is_memory_mapped_and_reads_like_zarr(tmp_path):
    """A contiguous uncompressed series (an ImageJ stack; a truncated one with fewer pages than planes, as ImageJ
    writes over 4 GB; tifffile's single-strip pages) is memory-mapped: a small region reads only its own
    pixels instead of whole-plane strips, and gives the same pixels as the zarr path."""
    stack = _image((5, 64, 80), seed=7, dtype=np.uint8)
    for kwargs in ({"imagej": True, "metadata": {"axes": "ZYX"}},
                   {"imagej": True, "truncate": True, "metadata": {"axes": "ZYX"}},
                   {"photometric": "minisblack"}):
        path = tmp_path / "contiguous.tif"
        tifffile.imwrite(path, stack, **kwargs)
        for mode in ("memmap", "zarr"):
            with open_source(path) as src:
                assert src._mode == "memmap"
                src._mode = mode
                np.testing.assert_array_equal(src.read(3, 5, 20, 7, 70), stack[3, 5:20, 7:70])
                if mode == "memmap":
                    assert src.stats["bytes_read"] == 15 * 63 and src.stats["segments_decoded"] == 0
                else:   # one whole-plane strip
                    assert src.stats["segments_decoded"] == 1 and src.stats["pixels_decoded"] == 64 * 80
    with open_source(path, section=4) as src:
        np.testing.assert_array_equal(src.read_section(), stack[4])


def test_chunk_stats_count_what_zarr_decodes(tmp_path):
    """segments_decoded is what the store was asked for: a counting zarr store around tifffile's ``aszarr``
    store sees exactly the chunk reads that ChunkCache reports (each one a TIFF tile decoded by tifffile), and
    cached chunks are not asked for again; the cache holds at most its size."""
    import zarr
    from zarr.storage import WrapperStore

    from hpc_zsem.io.regions import ChunkCache

    class Counting(WrapperStore):
        gets = 0

        async def get(self, key, prototype, byte_range=None):
            if key[0].isdigit():   # a chunk ("0.1"), not metadata (zarr.json, .zarray, .zattrs)
                Counting.gets += 1
            return await super().get(key, prototype, byte_range)

    image = _image((700, 600), seed=8)
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        arr = zarr.open_array(Counting(tif.series[0].aszarr()), mode="r")
        stats = {"segments_decoded": 0, "pixels_decoded": 0, "bytes_read": 0}
        cache = ChunkCache(arr, stats, cache_bytes=6 * 128 * 128 * 2)
        for box in [(0, 10, 0, 10), (5, 300, 100, 400), (250, 260, 250, 260), (600, 700, 500, 600),
                    (0, 700, 0, 600), (10, 20, 10, 20)]:
            before = Counting.gets
            np.testing.assert_array_equal(cache.read((), *box), image[box[0]:box[1], box[2]:box[3]])
            assert stats["segments_decoded"] == Counting.gets, box
            assert Counting.gets - before <= _tiles_of(*box, t=128)
            assert cache._cached <= 6 * 128 * 128 * 2
        before = Counting.gets
        np.testing.assert_array_equal(cache.read((), 20, 30, 20, 30), image[20:30, 20:30])   # cached tile
        assert Counting.gets == before and stats["segments_decoded"] == Counting.gets


def test_ome_tiff_pixel_size_is_parsed_as_xml_with_units(tmp_path):
    path = tmp_path / "calibrated.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 16, 16), np.float32), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 5.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4.0,
                               "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.05, "PhysicalSizeZUnit": "µm"})
    assert pixel_size_um(path) == pytest.approx((0.05, 0.004, 0.005))
    # attribute order, quoting and namespaces do not matter; unknown units give no calibration
    assert ome_pixel_size_um("<OME><Image><Pixels PhysicalSizeY='2' PhysicalSizeX='3'/></Image></OME>") == (2.0, 3.0)
    assert ome_pixel_size_um("<OME><Image><Pixels PhysicalSizeX='1' PhysicalSizeXUnit='parsec' "
                             "PhysicalSizeY='1'/></Image></OME>") is None
    assert ome_pixel_size_um("<not xml") is None
