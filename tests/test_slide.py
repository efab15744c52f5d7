"""Reading slides: formats, levels, mpp, pixel parity with OpenSlide, and every bad input."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, halve, write_ome_subifds, write_pyramid
from napari_bcd.errors import SlideError
from napari_bcd.io import open_slide


def _openslide_level(path: Path, level: int) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(path)) as o:
        w, h = o.level_dimensions[level]
        # Whole level from the origin: OpenSlide resamples reads at non-integer
        # downsamples, so only origin-anchored reads are pixel-comparable.
        return np.asarray(o.read_region((0, 0), level, (w, h)))[..., :3]


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.mean() < 0.5 and d.max() <= 4


def test_aperio_svs_matches_openslide() -> None:
    with open_slide(SAMPLE_SLIDE) as s:
        assert s.vendor == "svs"
        assert s.level_count == 1  # thumbnail, label and macro are not levels
        assert s.dimensions == (2967, 2220)
        assert s.mpp == pytest.approx((0.499, 0.499))
        h, w = s.dimensions
        _assert_close(s.read_region(0, 0, 0, h, w), _openslide_level(SAMPLE_SLIDE, 0))
        # Arbitrary level-0 regions, not tile aligned, equal the same pixels.
        whole = _openslide_level(SAMPLE_SLIDE, 0)
        for y, x, rh, rw in [(0, 0, 256, 256), (123, 457, 300, 511), (2900, 2100, 67, 120)]:
            _assert_close(s.read_region(0, y, x, rh, rw), whole[y : y + rh, x : x + rw])


def test_generic_pyramid_matches_openslide_at_every_level(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    path = write_pyramid(tmp_path / "pyramid.tif", cmu_rgb[:2048, :1792], levels=3, mpp=0.5)
    with open_slide(path) as s:
        assert s.level_count == 3
        assert [i.shape for i in s.level_info] == [(2048, 1792), (1024, 896), (512, 448)]
        assert s.level_info[2].downsample == (4.0, 4.0)
        assert s.mpp == pytest.approx((0.5, 0.5))
        for level in range(3):
            h, w = s.level_info[level].shape
            _assert_close(s.read_region(level, 0, 0, h, w), _openslide_level(path, level))


def test_pyramid_pages_without_subfile_flags_are_still_levels(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    path = write_pyramid(tmp_path / "flat.tif", cmu_rgb[:1024, :1024], levels=3, subfiletype=False)
    with open_slide(path) as s:
        assert [i.shape for i in s.level_info] == [(1024, 1024), (512, 512), (256, 256)]


def test_ome_tiff_with_subifds(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    img = cmu_rgb[:1536, :2048]
    path = write_ome_subifds(tmp_path / "slide.ome.tif", img, levels=3, mpp=0.25)
    with open_slide(path) as s:
        assert s.vendor == "ome"
        assert s.level_count == 3
        assert s.mpp == pytest.approx((0.25, 0.25))
        # JPEG round trip: close to the source pixels at level 0 and level 1.
        d0 = np.abs(s.read_region(0, 0, 0, 1536, 2048).astype(int) - img.astype(int))
        assert d0.mean() < 3
        d1 = np.abs(s.read_region(1, 0, 0, 768, 1024).astype(int) - halve(img).astype(int))
        assert d1.mean() < 3


def test_levels_are_lazy_dask_arrays(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    import dask.array as da

    path = write_pyramid(tmp_path / "p.tif", cmu_rgb[:1024, :1024], levels=2)
    with open_slide(path) as s:
        assert all(isinstance(lv, da.Array) for lv in s.levels)
        assert s.levels[0].shape == (1024, 1024, 3) and s.levels[0].dtype == np.uint8
        part = np.asarray(s.levels[1][100:300, 50:260])
        assert np.array_equal(part, s.read_region(1, 100, 50, 200, 210))


@pytest.mark.parametrize("name", ["stardist-histo-500x300.jpg", "histolab-tissue-level0-4302-10273-4814-10785.png"])
def test_plain_images(name: str) -> None:
    from PIL import Image

    with open_slide(DATA / name) as s:
        expected = np.asarray(Image.open(DATA / name).convert("RGB"))
        assert s.level_count == 1 and s.dimensions == expected.shape[:2]
        assert np.array_equal(s.read_region(0, 0, 0, *expected.shape[:2]), expected)
        assert s.mpp is None  # these files carry no usable pixel size
    assert open_slide(DATA / name, mpp=0.42).mpp == (0.42, 0.42)


def test_iciar_style_tiff_photo(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    import tifffile

    photo = cmu_rgb[:1536, :2048]
    tifffile.imwrite(tmp_path / "b001.tif", photo)  # ICIAR photos: 2048 x 1536 plain TIFF
    with open_slide(tmp_path / "b001.tif", mpp=0.42) as s:
        assert s.dimensions == (1536, 2048)
        assert np.array_equal(s.read_region(0, 10, 20, 100, 200), photo[10:110, 20:220])


def test_rgba_becomes_rgb(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    import tifffile

    rgba = np.concatenate([cmu_rgb[:512, :512], np.full((512, 512, 1), 255, np.uint8)], -1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(256, 256), photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(tmp_path / "rgba.tif") as s:
        assert np.array_equal(s.read_region(0, 0, 0, 512, 512), cmu_rgb[:512, :512])


def test_reads_outside_are_glass() -> None:
    with open_slide(SAMPLE_SLIDE) as s:
        r = s.read_region(0, -10, -10, 20, 20)
        assert (r[:10] == 255).all() and (r[:, :10] == 255).all()
        assert (s.read_region(0, 5000, 5000, 8, 8) == 255).all()


def test_thumbnail_of_a_slide_without_small_levels(cmu_rgb: np.ndarray) -> None:
    with open_slide(SAMPLE_SLIDE) as s:
        thumb, ds = s.thumbnail(1000)
    assert max(thumb.shape[:2]) <= 1000 and ds[0] == pytest.approx(2967 / thumb.shape[0])
    assert np.abs(thumb.astype(int).mean() - cmu_rgb.astype(int).mean()) < 2


# ----------------------------------------------------------------------------- bad input
def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="is a folder"):
        open_slide(tmp_path)
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(tmp_path / "empty.svs")


def test_text_file_named_svs(tmp_path: Path) -> None:
    (tmp_path / "notes.svs").write_text("this is not a slide")
    with pytest.raises(SlideError, match="not a slide or image"):
        open_slide(tmp_path / "notes.svs")


def test_truncated_tiff(tmp_path: Path) -> None:
    data = SAMPLE_SLIDE.read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated|corrupt"):
        open_slide(tmp_path / "cut.svs")
    (tmp_path / "header.svs").write_bytes(data[:100])
    with pytest.raises(SlideError):
        open_slide(tmp_path / "header.svs")


def test_corrupt_tile_is_a_clear_error(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    import tifffile

    path = write_pyramid(tmp_path / "bad.tif", cmu_rgb[:512, :512], levels=1)
    with tifffile.TiffFile(path) as tf:
        off, n = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[off + 20 : off + n] = b"\x00" * (n - 20)  # keep the JPEG header, destroy the scan
    path.write_bytes(bytes(raw))
    with open_slide(path) as s, pytest.raises(SlideError, match="corrupt"):
        s.read_region(0, 0, 0, 256, 256)


def test_sixteen_bit_grayscale_and_fluorescence_are_refused(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "u16.tif", np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    with pytest.raises(SlideError, match="16-bit"):
        open_slide(tmp_path / "u16.tif")
    tifffile.imwrite(tmp_path / "gray.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(SlideError, match="grayscale"):
        open_slide(tmp_path / "gray.tif")
    tifffile.imwrite(tmp_path / "if.ome.tif", np.zeros((5, 64, 64), np.uint8), metadata={"axes": "CYX"})
    with pytest.raises(SlideError, match="RGB"):
        open_slide(tmp_path / "if.ome.tif")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(SlideError, match="grayscale"):
        open_slide(tmp_path / "gray.png")


def _tiny_tiff_declaring(width: int, height: int) -> bytes:
    """A 300-byte classic TIFF whose one strip claims width x height RGB pixels."""
    import struct

    n = 10
    bps_at = 8 + 2 + n * 12 + 4
    data_at = bps_at + 6
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, data_at), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, width * height * 3), (284, 3, 1, 1),
    ]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n)
    for tag, typ, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if typ == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + b"\xff" * 64


def test_huge_dimensions_in_a_tiny_file_fail_fast(tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    path.write_bytes(_tiny_tiff_declaring(30_000, 30_000))  # claims 2.7 GB of pixels
    assert path.stat().st_size < 1000
    t0 = time.perf_counter()
    with pytest.raises(SlideError, match="truncated"):
        open_slide(path)
    assert time.perf_counter() - t0 < 5


def test_png_bomb_is_refused(tmp_path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(SlideError, match="60,000 x 60,000 px.*tiled pyramid"):
        open_slide(tmp_path / "bomb.png")
