"""Slides beyond what tifffile reads, through OpenSlide behind the same Slide API."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, write_pyramid
from napari_bcd.engine import classify
from napari_bcd.errors import SlideError
from napari_bcd.io import open_slide

openslide = pytest.importorskip("openslide")
DICOM = DATA / "dicom"


def _openslide_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as o:
        w, h = o.level_dimensions[level]
        return np.asarray(o.read_region((0, 0), level, (w, h)).convert("RGB"))


def test_the_openslide_backend_gives_openslides_pixels_and_the_same_class_map(tiny_model) -> None:
    with open_slide(SAMPLE_SLIDE, backend="openslide") as via_os, open_slide(SAMPLE_SLIDE) as via_tf:
        assert via_os.vendor == "openslide:aperio" and via_os.mpp == pytest.approx(via_tf.mpp)
        assert via_os.dimensions == via_tf.dimensions
        h, w = via_os.dimensions
        np.testing.assert_array_equal(via_os.read_region(0, 0, 0, h, w), _openslide_level(SAMPLE_SLIDE, 0))
        np.testing.assert_array_equal(via_os.read_region(0, 100, 1000, 300, 257), via_tf.read_region(0, 100, 1000, 300, 257))
        a, b = classify(via_os, tiny_model), classify(via_tf, tiny_model)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(np.nan_to_num(a.probs), np.nan_to_num(b.probs), atol=1e-6)


def test_a_pyramid_through_openslide_equals_tifffile_at_every_level(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    path = write_pyramid(tmp_path / "p.tif", cmu_rgb[:1024, :1024], levels=3, mpp=0.5)
    with open_slide(path, backend="openslide") as via_os, open_slide(path) as via_tf:
        assert via_os.level_count == via_tf.level_count == 3
        for level in range(3):
            h, w = via_os.level_info[level].shape
            mine = via_os.read_region(level, 0, 0, h, w)
            np.testing.assert_array_equal(mine, _openslide_level(path, level))
            np.testing.assert_array_equal(mine, via_tf.read_region(level, 0, 0, h, w))


@pytest.mark.parametrize("target", ["boxes_0.dcm", "."])
def test_dicom_wsi_by_file_or_folder(target: str) -> None:
    path = DICOM / target if target != "." else DICOM
    with open_slide(path) as slide:
        assert slide.vendor == "openslide:dicom"
        assert slide.mpp == pytest.approx((0.499, 0.499))  # from the DICOM pixel spacing
        h, w = slide.dimensions
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, h, w), _openslide_level(DICOM / "boxes_0.dcm", 0))
        assert slide.levels[0].shape == (h, w, 3)  # lazy dask levels, as for any slide


def test_a_missing_openslide_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if not installed
    with pytest.raises(SlideError, match=r'pip install "napari-bcd\[openslide\]"'):
        open_slide(DICOM / "boxes_0.dcm")
    (tmp_path / "x.mrxs").write_bytes(b"not a slide")
    with pytest.raises(SlideError, match="3DHISTECH MRXS.*openslide"):
        open_slide(tmp_path / "x.mrxs")


def test_the_reader_claims_what_it_reads_and_declines_the_rest(tmp_path: Path) -> None:
    from napari_bcd._reader import napari_get_reader

    assert callable(napari_get_reader(str(DICOM)))  # a DICOM WSI folder
    assert callable(napari_get_reader(str(DICOM / "boxes_0.dcm")))
    (tmp_path / "broken.mrxs").write_bytes(b"not a slide")
    assert napari_get_reader(str(tmp_path / "broken.mrxs")) is None
    (tmp_path / "image.zarr").mkdir()
    assert napari_get_reader(str(tmp_path / "image.zarr")) is None  # another reader's folder
