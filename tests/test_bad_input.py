"""Hostile but realistic input (issue 10): nothing lost, nothing silently wrong, no traceback.

Each group stands for a class of failure: options checked at parse time, files
that are damaged or not what they claim, outputs that must appear as one set,
and interruptions and races, which run the real command line in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, drain, four_kinds_dataset, load_rgb
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.cli import main
from napari_bcd.errors import AnnotationError, BcdError, DatasetError, SlideError

JPG = DATA / "stardist-histo-500x300.jpg"  # a real H&E image; with --mpp 1.0 it holds a few 200 µm windows


def _parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- options, at parse time
@pytest.mark.parametrize(("argv", "option"), [
    (["classify", "S", "--out", "O", "--mpp", "0"], "--mpp"),
    (["classify", "S", "--out", "O", "--mpp", "nan"], "--mpp"),
    (["classify", "S", "--out", "O", "--mpp", "-0.5"], "--mpp"),
    (["classify", "S", "--out", "O", "--stride-um", "nan"], "--stride-um"),
    (["classify", "S", "--out", "O", "--stride-um", "0"], "--stride-um"),
    (["classify", "S", "--out", "O", "--workers", "-1"], "--workers"),
    (["classify", "S", "--out", "O", "--min-tissue", "1.5"], "--min-tissue"),
    (["classify", "S", "--out", "O", "--batch-size", "x"], "--batch-size"),
    (["export-patches", "S", "A", "--out", "O", "--field-um", "0"], "--field-um"),
    (["export-patches", "S", "A", "--out", "O", "--field-um", "-100"], "--field-um"),
    (["export-patches", "S", "A", "--out", "O", "--mpp", "0"], "--mpp"),
    (["export-patches", "S", "A", "--out", "O", "--coverage", "2"], "--coverage"),
    (["export-patches", "S", "A", "--out", "O", "--label", "Tumor"], "--label"),
    (["train", "D", "--out", "M", "--lr", "nan"], "--lr"),
    (["train", "D", "--out", "M", "--val-fraction", "1"], "--val-fraction"),
    (["train", "D", "--out", "M", "--val-fraction", "1.5"], "--val-fraction"),
    (["train", "D", "--out", "M", "--input-px", "0"], "--input-px"),
    (["train", "D", "--out", "M", "--field-um", "0"], "--field-um"),
    (["train", "D", "--out", "M", "--epochs", "0"], "--epochs"),
    (["demo", "--stride", "0"], "--stride"),
])
def test_bad_options_are_named_at_parse_time(argv: list[str], option: str, capsys) -> None:
    err = _parse_error(argv, capsys)
    assert f"argument {option}" in err


def test_a_stride_that_would_exhaust_memory_is_refused(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(tmp_path),
                 "--stride-um", "0.001"]) == 1
    err = capsys.readouterr().err
    assert "larger stride" in err and "Traceback" not in err


# --------------------------------------------------------------------------- outputs: checked before work
def test_output_folders_that_cannot_work_are_refused_before_any_work(tmp_path: Path, tiny_checkpoint, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["classify", str(JPG), "--mpp", "1", "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    # The same stem twice would overwrite itself: refused before the model is even loaded.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / JPG.name).write_bytes(JPG.read_bytes())
    assert main(["classify", str(JPG), str(tmp_path / "b" / JPG.name), "--mpp", "1", "--model",
                 str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "would write the same outputs" in capsys.readouterr().err


def test_train_refuses_to_replace_a_checkpoint_or_write_into_a_folder(tmp_path: Path, capsys) -> None:
    ds = four_kinds_dataset(tmp_path / "ds", n=2)
    args = ["--backbone", "timm:resnet18", "--backbone-weights", "none", "--input-px", "64", "--epochs", "1"]
    assert main(["train", str(ds), "--out", str(tmp_path / "m"), *args]) == 0
    before = (tmp_path / "m.safetensors").stat().st_mtime_ns
    assert main(["train", str(ds), "--out", str(tmp_path / "m"), *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "m.safetensors").stat().st_mtime_ns == before
    assert main(["train", str(ds), "--out", str(tmp_path), *args]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_pickle_given_as_model_is_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    assert main(["model", "info", str(tmp_path / "x.pt")]) == 2
    assert "pickle" in capsys.readouterr().err


# --------------------------------------------------------------------------- files that are not what they claim
def _tiff_declaring(width: int, height: int) -> bytes:
    """A tiny TIFF whose one strip claims width x height RGB pixels but holds 64 bytes."""
    n = 10
    bps_at = 8 + 2 + n * 12 + 4
    data_at = bps_at + 6
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps_at), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, data_at), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, 64), (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", n)
    for tag, typ, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if typ == 3 and count == 1 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + b"\xff" * 64


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\xff" * 30)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_slides_declaring_impossible_sizes_fail_alone(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    (tmp_path / "huge.tif").write_bytes(_tiff_declaring(4_294_967_295, 4_294_967_295))
    (tmp_path / "white.png").write_bytes(_png_declaring(25_000, 25_000))
    from napari_bcd.io import open_slide

    with pytest.raises(SlideError, match="larger than any slide"):
        open_slide(tmp_path / "huge.tif")
    with pytest.raises(SlideError, match="25,000 x 25,000 px.*tiled pyramid"):
        open_slide(tmp_path / "white.png")
    # First of several slides: reported, and the others go on.
    code = main(["classify", str(tmp_path / "huge.tif"), str(tmp_path / "white.png"), str(JPG), "--mpp", "1",
                 "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "2 of 3 slide(s) failed" in err and "Traceback" not in err
    assert (tmp_path / "out" / f"{JPG.stem}.done.json").is_file()


def test_stacks_and_planar_images_get_their_own_message(tmp_path: Path) -> None:
    import tifffile

    from napari_bcd.io import open_slide

    rgb = load_rgb(JPG)[:64, :64]
    tifffile.imwrite(tmp_path / "z.tif", np.stack([rgb] * 3), photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    with pytest.raises(SlideError, match="several planes"):
        open_slide(tmp_path / "z.tif")
    with pytest.raises(SlideError, match="colour planes separately"):
        open_slide(tmp_path / "planar.tif")


def test_a_symlink_loop_is_called_what_it_is(tmp_path: Path) -> None:
    from napari_bcd.annotations import read_annotations
    from napari_bcd.io import open_slide

    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    with pytest.raises(SlideError, match="symbolic link"):
        open_slide(tmp_path / "a.svs")
    (tmp_path / "c.geojson").symlink_to(tmp_path / "c.geojson")
    with pytest.raises(AnnotationError, match="symbolic link"):
        read_annotations(tmp_path / "c.geojson")


def test_an_mpp_far_from_the_files_own_is_warned_about(caplog) -> None:
    from napari_bcd.io import open_slide

    with open_slide(SAMPLE_SLIDE, mpp=0.499 * 20):
        pass
    assert "20.0x the file's own" in caplog.text


@pytest.mark.parametrize(("name", "content"), [
    ("props.geojson", {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": "string",
     "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}}]}),
    ("coords.geojson", {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": 5}}),
    ("huge.geojson", '{"type":"Feature","properties":{},"geometry":{"type":"Polygon","coordinates":[[[0,0],[1'
     + "0" * 400 + ',0],[9,9],[0,0]]]}}'),
    ("deep.geojson", "[" * 100_000 + "]" * 100_000),
    ("inf.xml", '<Annotations><Annotation Id="1"><Regions><Region Type="2" Text="Benign"><Vertices>'
     '<Vertex X="inf" Y="0"/><Vertex X="10" Y="10"/></Vertices></Region></Regions></Annotation></Annotations>'),
    ("order.xml", '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="Tumor">'
     '<Coordinates><Coordinate Order="x" X="0" Y="0"/><Coordinate Order="1" X="9" Y="0"/>'
     '<Coordinate Order="2" X="9" Y="9"/></Coordinates></Annotation></Annotations></ASAP_Annotations>'),
])
def test_malformed_annotation_files_raise_our_error(tmp_path: Path, name: str, content) -> None:
    from napari_bcd.annotations import read_annotations

    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    try:
        read_annotations(p)  # may also read what is usable and skip the rest
    except AnnotationError as err:
        assert name in str(err) or "feature" in str(err)


def test_annotation_colours_and_encodings(tmp_path: Path) -> None:
    from napari_bcd.annotations import read_annotations

    doc = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
           "properties": {"classification": {"name": "Benign", "color": ["red", 0, 0]}}}
    (tmp_path / "a.geojson").write_text(json.dumps(doc))
    assert read_annotations(tmp_path / "a.geojson")[0].color is None  # the class colour is used
    (tmp_path / "u16.geojson").write_bytes(json.dumps(doc).encode("utf-16"))  # Windows tools write UTF-16
    assert read_annotations(tmp_path / "u16.geojson")[0].class_name == "Benign"


def test_settings_that_are_not_an_object_are_ignored(tmp_path: Path) -> None:
    from napari_bcd.config import config_dir, default_model_path, set_default_model

    config_dir().mkdir(parents=True, exist_ok=True)
    for text in ("[]", '{"default_model": 12}', "{nope"):
        (config_dir() / "settings.json").write_text(text)
        assert default_model_path() is None
        set_default_model(SAMPLE_SLIDE)  # and it can be written over
        assert default_model_path() == SAMPLE_SLIDE.resolve()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: np.zeros((64, 64), np.uint8), "grayscale"),
    (lambda: np.zeros((64, 64), np.uint16), "not 8-bit RGB"),
    (lambda: np.zeros((1, 1, 3), np.uint8), "at least 32 px"),
    (lambda: np.zeros((37, 500, 3), np.uint8), "sliver"),
])
def test_training_images_are_held_to_what_classify_accepts(tmp_path: Path, make, message: str) -> None:
    from PIL import Image

    from napari_bcd.train import read_iciar

    ds_root = four_kinds_dataset(tmp_path / "ds", n=2)
    Image.fromarray(make()).save(ds_root / "Normal" / "odd.png")
    ds = read_iciar(ds_root)
    odd = next(i for i, p in enumerate(ds.paths) if p.name == "odd.png")
    with pytest.raises(DatasetError, match=message):
        ds.load(odd)
    rgba = np.zeros((64, 64, 4), np.uint8)
    Image.fromarray(rgba).save(ds_root / "Normal" / "rgba.png")
    ds = read_iciar(ds_root)
    assert ds.load(next(i for i, p in enumerate(ds.paths) if p.name == "rgba.png")).shape == (64, 64, 3)


def test_export_patches_off_the_slide_says_so(tmp_path: Path) -> None:
    from napari_bcd.annotations import Annotation
    from napari_bcd.io import open_slide
    from napari_bcd.train.patches import plan_patches

    box = lambda y0, x0, y1, x1: np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)  # noqa: E731
    anns = [Annotation("Benign", "Benign", box(10_000, 10_000, 11_000, 11_000)),
            Annotation("Invasive", "Invasive", box(0, 900, 1500, 1500))]
    with open_slide(SAMPLE_SLIDE) as slide:
        plan = plan_patches(slide, anns, field_um=(100.0, 100.0))
        with pytest.raises(DatasetError, match="coverage"):
            plan_patches(slide, anns, field_um=(100.0, 100.0), coverage=2)
    assert plan.empty_classes == ["Benign"] and "outside the slide" in plan.advice()


def test_export_stopped_half_way_lists_exactly_the_patches_written(tmp_path: Path) -> None:
    import csv

    from napari_bcd.annotations import Annotation
    from napari_bcd.io import open_slide
    from napari_bcd.train.patches import ExportProgress, iter_export_patches

    box = lambda y0, x0, y1, x1: np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)  # noqa: E731
    anns = [Annotation("Invasive", "Invasive", box(0, 900, 1500, 1500)),
            Annotation("Benign", "Benign", box(1500, 800, 2967, 1600))]
    with open_slide(SAMPLE_SLIDE) as slide:
        gen = iter_export_patches(slide, anns, tmp_path / "p", field_um=(100.0, 100.0))
        for item in gen:
            if isinstance(item, ExportProgress) and item.done == 5:
                break
        gen.close()  # as Ctrl-C would
        def listed() -> set[str]:
            with open(tmp_path / "p" / "microscopy_ground_truth.csv") as fh:
                return {row[0] for row in csv.reader(fh) if row}

        files = {p.name for p in (tmp_path / "p").rglob("*.png")}
        assert len(files) == 5 and listed() == files
        # Again with another stride, and another label for the same area: names stay unique, one class each.
        anns2 = [Annotation("Normal", "Normal", box(0, 900, 1500, 1500))]
        drain(iter_export_patches(slide, anns2, tmp_path / "p", field_um=(100.0, 100.0), stride=0.5))
    names = [p.name for p in (tmp_path / "p").rglob("*.png")]
    assert len(names) == len(set(names)) and listed() == set(names)


def test_reports_average_over_the_classes_present() -> None:
    from napari_bcd.train.evaluate import report_from_predictions

    r = report_from_predictions([0, 0, 3, 3], [0, 3, 3, 3], ["Normal", "Benign", "InSitu", "Invasive"])
    assert r.support == [2, 0, 0, 2]
    assert r.macro["f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # the two classes with images, not four


def test_a_model_with_other_classes_is_shown_with_its_own(tmp_path: Path) -> None:
    import torch

    from napari_bcd.classes import CLASS_COLORS
    from napari_bcd.engine import iter_classify
    from napari_bcd.export import class_regions
    from napari_bcd.io import open_slide
    from napari_bcd.layers import label_colors
    from napari_bcd.model import build_classifier
    from napari_bcd.summary import summarize
    from napari_bcd.train import evaluate, read_iciar

    torch.manual_seed(0)
    classes = ("Normal", "Tumour", "Invasive carcinoma")
    model = build_classifier("timm:resnet18", backbone_weights=None, input_px=(64, 64), field_um=(200.0, 200.0),
                             classes=classes).eval()
    colors = label_colors(classes)
    assert colors[3][:3] == tuple(c / 255 for c in CLASS_COLORS[4])  # its third class is Invasive: red
    assert colors[2][:3] not in {tuple(c / 255 for c in v) for v in CLASS_COLORS.values()}  # Tumour: its own colour
    with open_slide(SAMPLE_SLIDE) as slide:
        _, cmap = drain(iter_classify(slide, model))
    s = summarize(cmap)
    assert [c.display_name for c in s.classes] == ["Normal", "Tumour", "Invasive carcinoma"]
    for a in class_regions(cmap):
        assert a.label in classes and (a.class_name == "Invasive") == (a.label == "Invasive carcinoma")
    # A folder with a class the model does not have is refused, not mapped by position.
    ds = read_iciar(four_kinds_dataset(tmp_path / "ds", n=2))
    with pytest.raises(DatasetError, match="Benign, InSitu.*does not know"):
        evaluate(model, ds)


# --------------------------------------------------------------------------- interruptions and races
def _cli(argv: list[str], patch: str = "") -> subprocess.Popen:
    """The real command line in a subprocess; ``patch`` runs first (to slow a step down, never to change it)."""
    code = f"import sys, time, os\n{patch}\nfrom napari_bcd.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(pred, timeout: float = 120.0) -> None:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


def _set_is_one_run(out: Path, stem: str) -> dict | None:
    """The done-record if the outputs are complete and all from the run it names; asserts it when present."""
    from napari_bcd.export import outputs_complete

    done = outputs_complete(out, stem)
    if done is not None:
        import hashlib

        for info in done["files"].values():
            assert hashlib.sha256((out / info["name"]).read_bytes()).hexdigest() == info["sha256"]
        summary = json.loads((out / f"{stem}.summary.json").read_text())
        assert summary["model"] == done["model"]
    return done


def _no_leftovers(out: Path, allowed: tuple[str, ...] = ()) -> None:
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in allowed]
    assert hidden == [], f"temporary files left: {hidden}"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from napari_bcd.model import build_classifier, save_checkpoint

    d = tmp_path_factory.mktemp("models")
    paths = []
    for name in ("alpha", "beta"):
        torch.manual_seed(len(name))
        m = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             field_um=(200.0, 200.0),
                             name=name)
        paths.append(save_checkpoint(m, path=d / f"{name}.safetensors"))
    return paths[0], paths[1]


def test_two_runs_into_one_folder_never_mix(tmp_path: Path, two_models) -> None:
    a, b = two_models
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        procs = [_cli(["classify", str(JPG), "--mpp", "1", "--model", str(m), "--out", str(out)]) for m in (a, b)]
        results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
        ok = [code for code, _ in results if code == 0]
        assert len(ok) == 1, results  # one wins; the other stops and says why
        loser = next(err for code, err in results if code != 0)
        assert "Another napari-bcd run" in loser or "already exist" in loser
        assert _set_is_one_run(out, JPG.stem) is not None
        _no_leftovers(out)


SLOW_WRITE = """
import napari_bcd.export as _e
_orig = _e.write_probabilities
def _slow(*a, **k):
    open(os.environ["BCD_TEST_MARK"], "w").close()
    time.sleep(60)
    return _orig(*a, **k)
_e.write_probabilities = _slow
"""

SLOW_RENAME = """
import napari_bcd.export as _e
_orig = os.replace
def _replace(src, dst):
    _orig(src, dst)
    if str(dst).endswith(".probabilities.tif") and ".partial-" not in str(dst):  # moved into place, not staged
        open(os.environ["BCD_TEST_MARK"], "w").close()
        time.sleep(60)
_e.os.replace = _replace
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_interrupting_the_write_phase_leaves_one_set_or_none(tmp_path: Path, two_models, sig, where,
                                                             monkeypatch) -> None:
    a, b = two_models
    out = tmp_path / "out"
    assert main(["classify", str(JPG), "--mpp", "1", "--model", str(a), "--out", str(out)]) == 0
    first = _set_is_one_run(out, JPG.stem)
    mark = tmp_path / "mark"
    monkeypatch.setenv("BCD_TEST_MARK", str(mark))
    proc = _cli(["classify", str(JPG), "--mpp", "1", "--model", str(b), "--out", str(out), "--overwrite"],
                SLOW_WRITE if where == "writing" else SLOW_RENAME)
    _wait_for(mark.exists)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    err = proc.communicate()[1]
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    # half moved, the files are marked as ours (so a rerun may replace them; files without it are the user's)
    _no_leftovers(out, (f".{JPG.stem}.writing",) if where == "renaming" else ())
    done = _set_is_one_run(out, JPG.stem)
    if where == "writing":
        assert done == first  # nothing was moved yet: the old set stands, whole
    else:
        assert done is None  # half moved: no record vouches for the mixed files
        # a rerun computes the incomplete slide again (no record vouches for its files), without --overwrite
        assert main(["classify", str(JPG), "--mpp", "1", "--model", str(b), "--out", str(out)]) == 0
        assert _set_is_one_run(out, JPG.stem)["model"] == "beta"
        _no_leftovers(out)


SLOW_CARD = """
import napari_bcd.model.checkpoint as _c
_orig = _c.output_file
def _slow(path, mode="w", replace="ours"):
    if str(path).endswith(".json"):
        open(os.environ["BCD_TEST_MARK"], "w").close()
        time.sleep(60)
    return _orig(path, mode, replace)
_c.output_file = _slow
"""


def test_interrupting_a_checkpoint_save_leaves_a_loadable_model(tmp_path: Path, monkeypatch) -> None:
    from napari_bcd.model import load_checkpoint

    ds = four_kinds_dataset(tmp_path / "ds", n=2)
    args = ["--backbone", "timm:resnet18", "--backbone-weights", "none", "--input-px", "64", "--epochs", "1"]
    assert main(["train", str(ds), "--out", str(tmp_path / "m"), *args, "--seed", "1"]) == 0
    old = load_checkpoint(tmp_path / "m.safetensors").card.weights_sha256
    mark = tmp_path / "mark"
    monkeypatch.setenv("BCD_TEST_MARK", str(mark))
    proc = _cli(["train", str(ds), "--out", str(tmp_path / "m"), *args, "--seed", "2", "--overwrite"], SLOW_CARD)
    _wait_for(mark.exists, timeout=300)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    # New weights beside the old card: the weights' own card is used, and the model loads.
    model = load_checkpoint(tmp_path / "m.safetensors")
    assert model.card.weights_sha256 != old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def test_errors_are_bcd_errors_in_the_api() -> None:
    # The classes of failure above surface as BcdError subclasses to Python callers too.
    for cls in (AnnotationError, DatasetError, SlideError):
        assert issubclass(cls, BcdError)


# --------------------------------------------------------------------------- checkpoints that cannot be trusted
def test_model_info_fails_on_weights_that_cannot_load(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    import shutil

    good = tmp_path / "good.safetensors"
    shutil.copy(tiny_checkpoint, good)
    shutil.copy(tiny_checkpoint.with_suffix(".json"), good.with_suffix(".json"))
    assert main(["model", "info", str(good)]) == 0
    capsys.readouterr()
    data = bytearray(good.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the last tensor
    good.write_bytes(bytes(data))
    assert main(["model", "info", str(good)]) == 2
    err = capsys.readouterr().err
    assert "does not load" in err and "does not match" in err and "Traceback" not in err
    good.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert main(["model", "info", str(good)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_weights_holding_nan_are_refused_before_classifying(tmp_path: Path, tiny_model, capsys) -> None:
    import copy

    import torch

    from napari_bcd.model import save_checkpoint
    from napari_bcd.model.checkpoint import CheckpointError, load_checkpoint

    bad = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(bad.head.parameters())[0].fill_(float("nan"))
    path = save_checkpoint(bad, path=tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)
    code = main(["classify", str(JPG), "--mpp", "1", "--model", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "NaN or infinite" in err and not (tmp_path / "out" / f"{JPG.stem}.done.json").exists()


@pytest.mark.parametrize("stats", [
    {"h_vector": [float("nan"), 0.5, 0.5], "e_vector": [0.1, 0.9, 0.3], "max_conc": [1.0, 1.0], "od_mean": [0, 0, 0]},
    {"h_vector": [0.6, 0.7, 0.3], "e_vector": [0.1, 0.9, 0.3], "max_conc": [0.0, 1.0], "od_mean": [0, 0, 0]},
    {"h_vector": [0.6, 0.7], "e_vector": [0.1, 0.9, 0.3], "max_conc": [1.0, 1.0], "od_mean": [0, 0, 0]},
])
def test_unusable_stain_statistics_are_named_not_used(stats: dict) -> None:
    from napari_bcd.stain import StainStats

    with pytest.raises(BcdError, match="model card's stain statistics"):
        StainStats.from_dict(stats)


@pytest.mark.parametrize(("errno_name", "words"), [
    ("ENOSPC", "the disk is full"), ("ENAMETOOLONG", "too long"), ("EROFS", "read-only"), ("EACCES", "permission"),
])
def test_system_errors_end_in_one_sentence(errno_name: str, words: str, tmp_path: Path, monkeypatch,
                                           capsys) -> None:
    import errno

    import napari_bcd.cli.classify as cli_classify

    def refuse(args):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(tmp_path / "x.tif"))

    monkeypatch.setattr(cli_classify, "_cmd_classify", refuse)  # the parser is built in main(): it takes this one
    assert main(["classify", str(JPG), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert words in err and "x.tif" in err and "Traceback" not in err


def test_a_decision_save_interrupted_between_its_writes_is_not_lost(tmp_path: Path, tiny_checkpoint: Path,
                                                                   caplog) -> None:
    import shutil

    from napari_bcd.decision import DecisionRule
    from napari_bcd.model.card import read_card
    from napari_bcd.model.checkpoint import load_checkpoint, save_decision

    path = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, path)
    shutil.copy(tiny_checkpoint.with_suffix(".json"), path.with_suffix(".json"))
    old_json = path.with_suffix(".json").read_text()
    time.sleep(1.1)  # the cards' times are to the second
    save_decision(path, DecisionRule(min_confidence=0.6))
    path.with_suffix(".json").write_text(old_json)  # as if killed after the weights, before the JSON
    assert read_card(path).decision.get("min_confidence") == 0.6
    assert load_checkpoint(path).card.decision.get("min_confidence") == 0.6
    assert "interrupted save" in caplog.text


def test_a_torchvision_that_cannot_load_is_named_not_blamed_on_the_weights(tiny_checkpoint: Path,
                                                                          monkeypatch) -> None:
    from napari_bcd.model import checkpoint
    from napari_bcd.model.checkpoint import CheckpointError, load_checkpoint

    def broken(*_a, **_k):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(checkpoint, "build_classifier", broken)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny_checkpoint)
    text = str(info.value)
    assert "torchvision does not match this torch" in text and "do not fit" not in text


def test_odd_paths_are_called_what_they_are(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    from napari_bcd.model.card import read_card
    from napari_bcd.model.checkpoint import CheckpointError

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(tmp_path / "loop.safetensors")
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        read_card(loop)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_card(tmp_path)
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere" / "at-all")
    assert main(["classify", str(JPG), "--mpp", "1", "--model", str(tiny_checkpoint), "--out", str(dangling)]) == 2
    assert "which does not exist" in capsys.readouterr().err
    # a retrain never replaces a checkpoint: its refusal offers no --overwrite it does not have
    from napari_bcd.model.checkpoint import check_checkpoint_target

    with pytest.raises(CheckpointError) as info:
        check_checkpoint_target(tiny_checkpoint, overwrite=None)
    assert "--overwrite" not in str(info.value)
    # a Zarr group whose metadata is broken is a damaged OME-Zarr, not "no slide"
    from napari_bcd import open_slide

    z = tmp_path / "broken.zarr"
    z.mkdir()
    (z / ".zgroup").write_text('{"zarr_format": 2}')
    (z / ".zattrs").write_text("{ broken")
    with pytest.raises(SlideError, match="OME-Zarr"):
        open_slide(z)


def test_a_binary_ground_truth_csv_is_named(tmp_path: Path, capsys) -> None:
    ds = four_kinds_dataset(tmp_path / "ds", n=2)
    (ds / "microscopy_ground_truth.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    from napari_bcd.train.iciar import read_iciar

    with pytest.raises(DatasetError, match="not a text CSV"):
        read_iciar(ds)
    assert main(["train", str(ds), "--out", str(tmp_path / "m.safetensors"), "--backbone", "timm:resnet18",
                 "--backbone-weights", "none"]) == 2
    assert "not a text CSV" in capsys.readouterr().err


def test_a_slide_name_that_is_not_utf8_is_printed_not_crashed_on(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import shutil

    folder = tmp_path / "slides"
    folder.mkdir()
    odd = Path(os.fsdecode(str(folder).encode() + b"/caf\xe9.jpg"))  # Latin-1 bytes in a UTF-8 file system
    shutil.copy(JPG, odd)
    shutil.copy(JPG, folder / "plain.jpg")  # two slides: a cohort table too
    proc = subprocess.run([sys.executable, "-m", "napari_bcd.cli", "classify", os.fsencode(odd),
                           str(folder / "plain.jpg"), "--mpp", "1",
                           "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "caf" in proc.stdout.decode("utf-8", "replace")
    table = (tmp_path / "out" / "cohort.csv").read_text(encoding="utf-8")
    assert "caf\ufffd" in table and table.count("done") == 2
