"""Annotations in and out, as QuPath, ImageScope (BACH) and ASAP write them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from napari_bcd.annotations import Annotation, read_annotations, write_geojson
from napari_bcd.classes import display_name
from napari_bcd.errors import AnnotationError

ANN = DATA / "annotations"


def _by_label(anns):
    out: dict[str, list[Annotation]] = {}
    for a in anns:
        out.setdefault(a.label, []).append(a)
    return out


def test_qupath_04_feature_collection() -> None:
    anns = read_annotations(ANN / "qupath-0.4.geojson")
    by = _by_label(anns)
    inv = by["Invasive carcinoma"][0]
    assert inv.class_name == "Invasive" and inv.color == (214, 39, 40)
    # [x, y] in the file -> (y, x), the closing vertex dropped.
    np.testing.assert_array_equal(inv.polygon, [[500, 1000], [500, 1800], [1300, 1800], [1300, 1000]])
    assert len(inv.holes) == 1 and inv.area_px == 800 * 800 - 200 * 200
    benign = by["Benign"]
    assert len(benign) == 2 and benign[0].group == benign[1].group  # one MultiPolygon feature
    assert by["Normal"][0].class_name == "Normal"  # the label came from `name`
    assert by["Stroma"][0].class_name == "Stroma"  # a class of the file's own, not one of the vocabulary
    r = anns.report
    assert r.format == "QuPath GeoJSON" and r.read == 5
    assert r.skipped == {"detection objects": 1, "Point geometries (not areas)": 1}
    assert r.classes == {"Invasive": 1, "Benign": 2, "Normal": 1, "Stroma": 1} and not r.unknown_labels
    assert "Stroma (1)" in str(r) and "detection" in str(r)


def test_qupath_02_bare_list_with_packed_colours() -> None:
    anns = read_annotations(ANN / "qupath-0.2.geojson", label_map={"Tumor": "Invasive"})
    by = _by_label(anns)
    assert by["Tumor"][0].class_name == "Invasive" and by["Tumor"][0].color == (200, 0, 0)  # colorRGB -3670016
    assert by["In situ"][0].class_name == "InSitu" and by["In situ"][0].color == (0, 128, 0)
    np.testing.assert_allclose(by["Tumor"][0].polygon[0], [400.25, 500.5])
    assert anns.report.skipped == {"cell objects": 1, "LineString geometries (not areas)": 1}


def test_bach_imagescope_xml() -> None:
    anns = read_annotations(ANN / "bach-imagescope.xml")
    assert anns.report.format == "Aperio ImageScope XML"
    by = _by_label(anns)
    assert {k: v[0].class_name for k, v in by.items()} == {
        "Benign": "Benign",
        "Carcinoma in situ": "InSitu",
        "Carcinoma invasive": "Invasive",  # label from Attributes/Attribute@Value
        "Invasive carcinoma": "Invasive",
        "In situ carcinoma": "InSitu",
        "normal": "Normal",
    }
    benign = by["Benign"][0]
    assert len(benign.polygon) == 4  # repeated closing vertices removed
    np.testing.assert_array_equal(benign.polygon[1], [2000, 1800])
    assert benign.color == (0, 255, 0)  # LineColor 65280 is BGR-packed green
    assert by["In situ carcinoma"][0].color == (255, 0, 0)
    inv = by["Invasive carcinoma"][0]
    assert len(inv.holes) == 1  # the negative region
    assert inv.area_px == 400 * 400 - 100 * 100
    assert anns.report.skipped == {"rulers and arrows": 1}
    assert not anns.report.unknown_labels


def test_asap_xml() -> None:
    anns = read_annotations(ANN / "asap.xml", label_map={"_2": "InSitu"})
    assert anns.report.format == "ASAP XML"
    by = _by_label(anns)
    tumor = by["Tumor"][0]
    assert tumor.class_name == "Tumor" and tumor.color == (0xF4, 0xFA, 0x58)  # a class of its own without a map
    assert len(tumor.polygon) == 4  # an open ring is closed implicitly
    spline = by["Benign"][0]
    assert spline.class_name == "Benign" and len(spline.polygon) == 32  # Catmull-Rom through 4 points, sorted by Order
    assert spline.polygon[0].tolist() == [500, 500]
    assert by["Normal"][0].class_name == "Normal" and by["Normal"][0].area_px == 200 * 100
    assert by["_2"][0].class_name == "InSitu" and len(by["_2"][0].polygon) == 4
    assert anns.report.skipped == {"dot annotations (not areas)": 1}
    assert anns.report.classes["Tumor"] == 1 and not anns.report.unknown_labels


@pytest.mark.parametrize("name", ["qupath-0.4.geojson", "qupath-0.2.geojson", "bach-imagescope.xml", "asap.xml"])
def test_geojson_round_trip(name: str, tmp_path: Path) -> None:
    anns = read_annotations(ANN / name)
    out = write_geojson(anns, tmp_path / "out.geojson")
    doc = json.loads(out.read_text())
    for f in doc["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert len(f["id"]) == 36  # a UUID, as QuPath writes
    back = read_annotations(out)
    assert len(back) == len(anns)
    names = {f["properties"].get("name") for f in doc["features"]}
    for a, b in zip(anns, back, strict=True):
        assert a.class_name == b.class_name
        if a.class_name is None:
            assert a.label == b.label
        else:  # one name per class in what we write; the file's own label kept as the object's name
            assert b.label == display_name(a.class_name)
            assert a.label == b.label or a.label in names
        np.testing.assert_allclose(a.polygon, b.polygon, atol=1e-3)
        assert len(a.holes) == len(b.holes)
        for ha, hb in zip(a.holes, b.holes, strict=True):
            np.testing.assert_allclose(ha, hb, atol=1e-3)
        assert (a.group is None) == (b.group is None)


def test_write_never_overwrites_unless_asked(tmp_path: Path) -> None:
    anns = read_annotations(ANN / "asap.xml")
    path = write_geojson(anns, tmp_path / "a.geojson")
    before = path.read_bytes()
    with pytest.raises(Exception, match="already exists"):
        write_geojson(anns[:1], path)
    assert path.read_bytes() == before
    write_geojson(anns[:1], path, overwrite=True)
    assert len(json.loads(path.read_text())["features"]) == 1


# ----------------------------------------------------------------------------- malformed input
def test_bad_json(tmp_path: Path) -> None:
    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_annotations(tmp_path / "a.geojson")


def test_xml_entities_are_refused(tmp_path: Path) -> None:
    bomb = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Annotations><Annotation><Regions><Region Text="&lol2;"><Vertices>
<Vertex X="0" Y="0"/><Vertex X="1" Y="0"/><Vertex X="1" Y="1"/></Vertices></Region></Regions>
</Annotation></Annotations>"""
    (tmp_path / "bomb.xml").write_text(bomb)
    with pytest.raises(AnnotationError, match="entities"):
        read_annotations(tmp_path / "bomb.xml")


def test_no_polygons(tmp_path: Path) -> None:
    doc = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point",
                                                                                      "coordinates": [1, 2]},
        "properties": {}}]}
    (tmp_path / "p.geojson").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match="no polygon annotations.*Point"):
        read_annotations(tmp_path / "p.geojson")


def test_nan_coordinates(tmp_path: Path) -> None:
    (tmp_path / "n.geojson").write_text(
        '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [1, 1], [0, 0]]]}'
    )
    with pytest.raises(AnnotationError, match="NaN"):
        read_annotations(tmp_path / "n.geojson")


def test_self_intersecting_ring_is_repaired_and_reported(tmp_path: Path) -> None:
    bowtie = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 100], [100, 0],
                                                                                  [0, 100], [0, 0]]]},
              "properties": {"classification": {"name": "Benign"}}}
    (tmp_path / "b.geojson").write_text(json.dumps(bowtie))
    anns = read_annotations(tmp_path / "b.geojson")
    assert len(anns) == 2 and all(a.class_name == "Benign" for a in anns)
    assert sum(a.area_px for a in anns) == pytest.approx(5000)
    assert anns.report.repaired and "self-intersecting" in anns.report.repaired[0]


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="does not exist"):
        read_annotations(tmp_path / "none.geojson")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(AnnotationError, match="not an annotation file"):
        read_annotations(tmp_path / "x.txt")
    (tmp_path / "y.xml").write_text("<svg></svg>")
    with pytest.raises(AnnotationError, match="root <svg>"):
        read_annotations(tmp_path / "y.xml")
    (tmp_path / "z.xml").write_text("<Annotations><Region>")
    with pytest.raises(AnnotationError, match="well-formed"):
        read_annotations(tmp_path / "z.xml")


def test_label_map_to_a_non_class_is_an_error(tmp_path: Path) -> None:
    from napari_bcd.errors import BcdError

    with pytest.raises(BcdError, match="names no class"):
        read_annotations(ANN / "asap.xml", label_map={"Tumor": "unclassified"})
    # a label mapped to a name the vocabulary does not know is that class (classes come from the data)
    renamed = read_annotations(ANN / "asap.xml", label_map={"Tumor": "Cancerous"})
    assert "Cancerous" in {a.class_name for a in renamed}


def test_format_is_known_from_content_not_extension(tmp_path: Path) -> None:
    (tmp_path / "annotations.txt").write_bytes((ANN / "bach-imagescope.xml").read_bytes())
    assert read_annotations(tmp_path / "annotations.txt").report.format == "Aperio ImageScope XML"


def test_one_name_per_class_and_no_class_for_unclassified(tmp_path: Path) -> None:
    """The class map's regions ("Invasive", from the model's classes) and a shape set in napari ("Invasive
    carcinoma") reach QuPath as one class; an unclassified shape has no classification (not Normal's colour)."""
    square = np.array([[0, 0], [0, 10], [10, 10], [10, 0]], float)
    anns = [Annotation("Invasive", "Invasive", square), Annotation("Invasive carcinoma", "Invasive", square + 20),
            Annotation("unclassified", None, square + 40, color=(0, 255, 0))]
    doc = json.loads(write_geojson(anns, tmp_path / "a.geojson").read_text())
    first, second, third = (f["properties"] for f in doc["features"])
    assert first["classification"] == second["classification"]
    assert first["classification"]["name"] == "Invasive carcinoma" and first["name"] == "Invasive"
    assert "classification" not in third
