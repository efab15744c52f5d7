"""What can be tested of the QuPath side without QuPath: the GeoJSON round trip and the scripts' command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE
from napari_bcd.annotations import read_annotations
from napari_bcd.cli import build_parser, main

QUPATH = Path(__file__).parents[1] / "src" / "napari_bcd" / "qupath"


def test_the_cli_geojson_round_trips_with_classes_holes_and_measurements(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(tmp_path),
                 "--stride", "0.5"]) == 0
    geo = tmp_path / "CMU-1-Small-Region.geojson"
    doc = json.loads(geo.read_text())
    summary = json.loads((tmp_path / "CMU-1-Small-Region.summary.json").read_text())
    anns = read_annotations(geo)
    by_class: dict[str, list] = {}
    for a in anns:
        by_class.setdefault(a.label, []).append(a)
    # what quality control left out travels as QuPath's ignored class, named by its reason, never as a class
    ignored = by_class.pop("Ignore*", [])
    assert all(a.class_name is None and (a.name or "").startswith("QC: ") for a in ignored)
    per_reason = {a.name: a.measurements["Tissue left out mm^2"] for a in ignored}  # one feature, many parts
    assert sum(per_reason.values()) == pytest.approx(summary["left_out_mm2"], abs=1e-5)
    from napari_bcd.classes import DISPLAY_NAMES, class_id

    # QuPath gets one name per class (the display name, as the Annotations dock's "Set class" writes it)
    classified = {DISPLAY_NAMES[class_id(c["name"])]: c for c in summary["classes"] if c["cells"]}
    assert set(by_class) == set(classified)
    for display, parts in by_class.items():
        name = classified[display]["name"]
        m = parts[0].measurements
        assert m["Area mm^2"] == pytest.approx(classified[display]["area_mm2"])
        assert m[f"Mean p({name})"] == pytest.approx(classified[display]["mean_probability"], abs=1e-5)
        assert set(m) >= {"Tissue %", "Windows", "Mean p(Normal)", "Mean p(Invasive)"}
        # the polygons' area is the class's area (holes subtracted)
        area_px = sum(a.area_px for a in parts)
        assert area_px * 0.499**2 / 1e6 == pytest.approx(classified[display]["area_mm2"], rel=1e-3)
        assert parts[0].class_name is not None and parts[0].to_shapely().is_valid
    # holes travel too: a ring region with measurements, written and read back
    from napari_bcd.annotations import Annotation, write_geojson

    ring = Annotation("Invasive", "Invasive", np.array([[0, 0], [0, 100], [100, 100], [100, 0]]),
                      holes=[np.array([[40, 40], [40, 60], [60, 60], [60, 40]])], measurements={"Area mm^2": 0.5})
    back = read_annotations(write_geojson([ring], tmp_path / "ring.geojson"))[0]
    assert back.area_px == pytest.approx(100 * 100 - 20 * 20) and len(back.holes) == 1
    assert back.measurements == {"Area mm^2": 0.5} and back.class_name == "Invasive"
    # QuPath 0.2/0.3 wrote measurements as a list of {name, value}: read too
    old = tmp_path / "old.geojson"
    feature = doc["features"][0]
    feature["properties"]["measurements"] = [{"name": k, "value": v}
                                             for k, v in feature["properties"]["measurements"].items()]
    old.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    expected = next(a for a in anns if a.label == feature["properties"]["classification"]["name"]).measurements
    assert read_annotations(old)[0].measurements == expected


def _command_lines(script: str) -> list[str]:
    text = (QUPATH / script).read_text()
    block = re.search(r"// napari-bcd command.*?\n(.*?)// end of napari-bcd command", text, re.S)
    assert block, "the command block markers are missing"
    return block.group(1).splitlines()


def _build(lines: list[str], **values) -> list[str]:
    """Evaluate the script's command-building lines (a small Groovy subset: list literals, +=, if)."""
    cmd: list[str] = []
    env = dict(values)
    for line in lines:
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        cond = re.match(r"if \((.+?)\) cmd \+= \[(.*)\]$", line)
        if cond:
            test = cond.group(1)
            ok = env[test.split()[0]] is not None if "!= null" in test else bool(env[test])
            if ok:
                cmd += [_value(v, env) for v in cond.group(2).split(",")]
            continue
        if line.startswith("def cmd = ["):
            cmd = [_value(v, env) for v in line[len("def cmd = ["):-1].split(",")]
        elif line == "cmd += EXTRA":
            cmd += env["EXTRA"]
        else:
            raise AssertionError(f"unexpected line in the command block: {line}")
    return cmd


def _value(token: str, env: dict) -> str:
    token = token.strip()
    if token.startswith('"'):
        return token.strip('"')
    m = re.match(r"String\.valueOf\((\w+)\)", token)
    return str(env[m.group(1) if m else token])


@pytest.mark.parametrize("mpp", [None, 0.2527])
def test_the_classify_script_builds_a_command_napari_bcd_accepts(mpp, tmp_path: Path) -> None:
    cmd = _build(_command_lines("napari_bcd_classify.groovy"), NAPARI_BCD="napari-bcd",
                 slidePath="/data/slide 1.svs", outDir=str(tmp_path), mpp=mpp, MODEL="/m/model.safetensors",
                 EXTRA=["--stride", "0.5"])
    assert cmd[0] == "napari-bcd" and cmd[1] == "classify"
    args = build_parser().parse_args(cmd[1:])
    assert args.slides == ["/data/slide 1.svs"] and args.out == str(tmp_path)
    assert args.mpp == mpp and args.model == "/m/model.safetensors" and args.stride == 0.5
    text = (QUPATH / "napari_bcd_classify.groovy").read_text()
    # it imports the GeoJSON classify writes, named after the slide
    assert 'stem + ".geojson"' in text and "PathIO.readObjects" in text and "addObjects" in text


def test_the_export_script_writes_what_export_patches_reads() -> None:
    text = (QUPATH / "napari_bcd_export_annotations.groovy").read_text()
    assert 'exportObjectsToGeoJson(annotations, path, "FEATURE_COLLECTION")' in text
    assert "napari-bcd export-patches" in text


def _groovy_code(text: str) -> str:
    """The script with comments, strings and /regex/ literals blanked: what is left is brackets and code."""
    out, i, n = [], 0, len(text)
    while i < n:
        two = text[i : i + 2]
        if two == "//":
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif two == "/*":
            end = text.find("*/", i + 2)
            assert end >= 0, "an unclosed /* comment"
            i = end + 2
        elif text[i] in "\"'":
            q = text[i]
            j = i + 1
            while j < n and text[j] != q:
                j += 2 if text[j] == "\\" else 1
            assert j < n, f"an unclosed string at {text[i : i + 30]!r}"
            i = j + 1
        elif text[i] == "/" and text[:i].rstrip().endswith("=~"):
            end = text.find("/", i + 1)
            assert end >= 0, "an unclosed /regex/"
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _unbalanced(code: str) -> str | None:
    """What does not close in ``code`` (brackets), or None."""
    stack = []
    for k, ch in enumerate(code):
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or stack[-1] != {")": "(", "]": "[", "}": "{"}[ch]:
                return f"unmatched {ch!r} after {code[max(k - 40, 0) : k]!r}"
            stack.pop()
    return f"unclosed {stack[-1]!r}" if stack else None


@pytest.mark.parametrize("script", ["napari_bcd_classify.groovy", "napari_bcd_export_annotations.groovy"])
def test_the_scripts_brackets_strings_and_comments_close(script: str) -> None:
    """No Groovy here to compile them; this catches what editing breaks most: an unclosed bracket, string, comment."""
    assert _unbalanced(_groovy_code((QUPATH / script).read_text())) is None
    # the checker bites
    assert _unbalanced(_groovy_code('def a = (1] // (')) == "unmatched ']' after 'def a = (1'"
    assert _unbalanced(_groovy_code('m = line =~ /(\\d+)%\\|/\nif (x) { y("(") }')) is None
    with pytest.raises(AssertionError, match="unclosed string"):
        _groovy_code('x = "open')
