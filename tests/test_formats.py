"""Slides beyond what tifffile reads, through OpenSlide behind the same Slide API."""

from __future__ import annotations

import json
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
        np.testing.assert_array_equal(via_os.read_region(0, 100, 1000, 300, 257), via_tf.read_region(0, 100, 1000, 300,
                                                                                                     257))
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


def write_ome_zarr(path: Path, image: np.ndarray, levels: int = 3, mpp: float = 0.5, version: str = "0.4",
                   unit: str | None = "micrometer", chunk: int = 256) -> list[np.ndarray]:
    """An OME-NGFF multiscale RGB image (c, y, x) as the spec lays it out: 0.4 on Zarr v2, 0.5 on Zarr v3."""
    import zarr

    from conftest import halve

    fmt = 2 if version == "0.4" else 3
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    pyramid, datasets = [], []
    lvl = image
    for i in range(levels):
        arr = group.create_array(str(i), shape=(3, *lvl.shape[:2]), chunks=(3, chunk, chunk), dtype="uint8")
        arr[:] = np.moveaxis(lvl, -1, 0)
        pyramid.append(lvl)
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, mpp * 2**i, mpp * 2**i]}]})
        lvl = halve(lvl)
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in ("y", "x")]
    ms = [{"version": version, "axes": axes, "datasets": datasets, "name": "slide"}] if version == "0.4" else \
        [{"axes": axes, "datasets": datasets, "name": "slide"}]
    if version == "0.4":
        group.attrs["multiscales"] = ms
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    return pyramid


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_levels_mpp_and_classify(version: str, tmp_path: Path, cmu_rgb: np.ndarray, tiny_checkpoint,
                                          capsys) -> None:
    from napari_bcd import open_slide
    from napari_bcd._reader import napari_get_reader
    from napari_bcd.cli import main

    img = np.ascontiguousarray(cmu_rgb[:1500, :1300])
    path = tmp_path / f"slide-{version}.ome.zarr"
    pyramid = write_ome_zarr(path, img, version=version)
    with open_slide(path) as slide:
        assert slide.mpp == (0.5, 0.5) and slide.vendor == "ome-zarr" and slide.level_count == 3
        for i, ref in enumerate(pyramid):
            assert slide.level_info[i].shape == ref.shape[:2]
            assert np.array_equal(slide.read_region(i, 0, 0, *ref.shape[:2]), ref)
            assert np.array_equal(np.asarray(slide.levels[i]), ref)
        # a band of chunk rows, as the engine reads it
        row = slide.read_tile_row(0, 1, [0, 2])
        assert np.array_equal(row[:, 512:768], img[256:512, 512:768]) and (row[:, 256:512] == 255).all()
    assert napari_get_reader(str(path)) is not None
    assert main(["classify", str(path), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / f"slide-{version}.ome.summary.json").read_text())
    assert summary["windows"] > 0


def test_ome_zarr_units_and_refusals(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    import zarr

    from napari_bcd import open_slide
    from napari_bcd._reader import napari_get_reader
    from napari_bcd.errors import SlideError

    img = np.ascontiguousarray(cmu_rgb[:600, :600])
    write_ome_zarr(tmp_path / "nm.zarr", img, levels=1, mpp=499.0, unit="nanometer")
    with open_slide(tmp_path / "nm.zarr") as slide:
        assert slide.mpp == pytest.approx((0.499, 0.499))
    write_ome_zarr(tmp_path / "px.zarr", img, levels=1, mpp=1.0, unit=None)
    with open_slide(tmp_path / "px.zarr") as slide:
        assert slide.mpp is None  # a scale of 1 without a unit says nothing
    fluo = zarr.open_group(str(tmp_path / "fluo.zarr"), mode="w", zarr_format=2)
    fluo.create_array("0", shape=(2, 64, 64), chunks=(1, 64, 64), dtype="uint16")
    fluo.attrs["multiscales"] = [{"version": "0.4", "axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}]
    with pytest.raises(SlideError, match="channel"):
        open_slide(tmp_path / "fluo.zarr")
    assert napari_get_reader(str(tmp_path / "fluo.zarr")) is None  # left to other readers
    (tmp_path / "plain").mkdir()
    with pytest.raises(SlideError, match="OME-Zarr"):
        open_slide(tmp_path / "plain")


def test_ome_zarr_as_other_tools_write_it_or_damaged(tmp_path: Path, cmu_rgb: np.ndarray, caplog, tiny_checkpoint,
                                                     capsys) -> None:
    import shutil

    import zarr

    from napari_bcd import open_slide
    from napari_bcd.errors import SlideError

    img = np.ascontiguousarray(cmu_rgb[:600, :600])

    def edit(name: str, change) -> Path:
        path = tmp_path / name
        write_ome_zarr(path, img, levels=2)
        group = zarr.open_group(str(path), mode="r+")
        ms = group.attrs["multiscales"]
        change(ms[0], path)
        group.attrs["multiscales"] = ms
        return path

    def upper(m, _path):
        for a in m["axes"]:
            a["name"] = a["name"].upper()  # iohub writes T, C, Z, Y, X

    with open_slide(edit("upper.zarr", upper)) as slide:
        assert slide.mpp == (0.5, 0.5) and np.array_equal(slide.read_region(0, 0, 0, 600, 600), img)
    with open_slide(edit("reversed.zarr", lambda m, _p: m["datasets"].reverse())) as slide:  # smallest first
        assert slide.level_info[0].shape == (600, 600) and slide.mpp == (0.5, 0.5)
    with pytest.raises(SlideError, match="not a list of named axes"):
        open_slide(edit("unnamed.zarr", lambda m, _p: [a.pop("name") for a in m["axes"]]))

    def short(m, _path):
        for d in m["datasets"]:
            d["coordinateTransformations"][0]["scale"] = [0.5, 0.5]

    with pytest.raises(SlideError, match="2 values for 3 axes"):
        open_slide(edit("short.zarr", short))

    def broken_array(_m, path):
        meta = path / "0" / ".zarray"
        meta.write_text("{ not json")

    with pytest.raises(SlideError, match="damaged"):
        open_slide(edit("broken.zarr", broken_array))

    def lose_chunks(_m, path):
        for chunk in sorted((path / "0").glob("0.*"))[:2]:
            shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()

    with open_slide(edit("holes.zarr", lose_chunks)):
        pass
    assert "chunks of level 0 are missing" in caplog.text

    def lose_level1_chunks(_m, path):  # issue 40: the engine may read level 1, whose holes went unsaid
        for chunk in sorted((path / "1").glob("0.*"))[:1]:
            shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()

    caplog.clear()
    with open_slide(edit("holes1.zarr", lose_level1_chunks)):
        pass
    assert "chunks of level 1 are missing" in caplog.text and "of level 0" not in caplog.text

    def corrupt_chunk(_m, path):
        chunk = sorted(c for c in (path / "0").rglob("*") if c.is_file() and not c.name.startswith("."))[0]
        chunk.write_bytes(b"\x00garbage" * 7)  # a chunk the codec cannot decode

    damaged = r"corrupt.zarr: the chunk\(s\) at y 0-600, x 0-600 of level 0 cannot be decoded .*damaged there"
    with open_slide(edit("corrupt.zarr", corrupt_chunk)) as slide, pytest.raises(SlideError, match=damaged):
        slide.read_region(0, 0, 0, 600, 600)
    from napari_bcd.cli import main

    out = tmp_path / "out"
    assert main(["classify", str(tmp_path / "corrupt.zarr"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 1
    assert "corrupt.zarr: the chunk(s) at" in capsys.readouterr().err and not list(out.glob("corrupt.*"))


def test_openslide_failures_name_companions_only_where_they_apply(tmp_path: Path) -> None:
    from napari_bcd.errors import SlideError
    from napari_bcd.io.openslide_slides import open_openslide

    lonely = tmp_path / "scan.mrxs"
    lonely.write_text("[GENERAL]\n")  # an MRXS index without its folder
    with pytest.raises(SlideError, match="companion folder"):
        open_openslide(lonely, "MIRAX")
    broken = tmp_path / "scan.scn"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(SlideError) as info:
        open_openslide(broken, "Leica SCN")
    assert "companion" not in str(info.value) and "damaged or incomplete" in str(info.value)


def test_an_openslide_read_that_fails_stops_that_slide_with_a_message_and_recovers_the_handle(tmp_path: Path,
                                                                                            monkeypatch) -> None:
    import threading

    from napari_bcd.errors import SlideError
    from napari_bcd.io.openslide_slides import OpenSlideSegments

    class Short:
        """A DICOM whose edge tiles are stored short: OpenSlide fails the read, then every later one."""

        level_dimensions = ((1024, 1024),)
        level_downsamples = (1.0,)

        def read_region(self, xy, level, size):
            raise openslide.OpenSlideError("TIFFRGBAImageGet failed")

    opened = []
    monkeypatch.setattr(openslide, "OpenSlide", lambda path: opened.append(path) or "fresh handle")
    seg = OpenSlideSegments(Short(), 0, threading.Lock(), tmp_path / "edge.dcm")
    with pytest.raises(SlideError, match="edge.dcm: OpenSlide could not read level 0 at x=512, y=0"):
        seg.tile(0, 1)
    assert opened == [str(tmp_path / "edge.dcm")] and seg.osr == "fresh handle"


def test_a_slide_failing_in_its_reader_fails_alone_and_the_cohort_gets_its_table(tmp_path: Path, tiny_checkpoint,
                                                                                 monkeypatch, capsys) -> None:
    import napari_bcd.engine as engine
    from conftest import write_pyramid
    from napari_bcd.cli import main

    slides = [write_pyramid(tmp_path / f"s{k}.tif", np.full((600, 600, 3), 120, np.uint8), levels=1, mpp=0.5)
              for k in range(2)]
    real = engine.iter_classify

    def sometimes(slide, *a, **k):
        if slide.name == "s0.tif":
            raise RuntimeError("a reader's own error")
        return real(slide, *a, **k)

    monkeypatch.setattr(engine, "iter_classify", sometimes)
    code = main(["classify", *map(str, slides), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"),
                 "--tissue-threshold", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "RuntimeError: a reader's own error" in err and "Traceback" not in err
    rows = (tmp_path / "out" / "cohort.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows[1:]] == ["failed", "done"]


def test_a_dicom_folder_opens_its_wsi_series_and_says_when_it_holds_several(tmp_path: Path, caplog) -> None:
    import shutil

    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import generate_uid

    from napari_bcd.errors import SlideError

    folder = tmp_path / "case"
    folder.mkdir()
    # a non-WSI instance sorted first (a Basic Text structured report): the folder is still the slide
    sr = pydicom.dcmread(DICOM / "boxes_0.dcm", stop_before_pixels=True)
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.save_as(folder / "0_report.dcm")
    for f in DICOM.glob("*.dcm"):
        shutil.copy(f, folder / f.name)
    with open_slide(folder) as slide:
        assert slide.vendor == "openslide:dicom" and slide.dimensions == (16, 16)
    assert "slides" not in caplog.text
    # a second slide's instances in the same folder: one is opened, and the folder's content is said
    second = generate_uid()
    for f in DICOM.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = second
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"other_{f.name}")
    with open_slide(folder) as slide:
        assert slide.dimensions == (16, 16)
    assert "holds the instances of 2 slides" in caplog.text
    only_report = tmp_path / "report"
    only_report.mkdir()
    shutil.copy(folder / "0_report.dcm", only_report / "0_report.dcm")
    with pytest.raises(SlideError, match="none of them a whole-slide image"):
        open_slide(only_report)
