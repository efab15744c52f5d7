"""The output guard: no command replaces a file napari-bcd did not write, writes through a link, or lets two runs
report one file.  Every case checks the exit code, the message and that the user's files are byte-identical."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import SAMPLE_SLIDE, two_kinds_dataset
from napari_bcd._fileio import LEDGER, OutputConflict, check_output, is_ours, output_file, output_path
from napari_bcd.cli import main
from napari_bcd.errors import BcdError, CheckpointError

USER = b"the user's own file, not napari-bcd's\n"


def _user_file(path: Path, data: bytes = USER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- the guard itself ----------------------------------------------------------------------------------------------


def test_a_file_written_by_us_may_be_replaced_a_users_may_not(tmp_path: Path) -> None:
    ours = tmp_path / "report.json"
    with output_file(ours) as fh:
        fh.write("{}")
    assert is_ours(ours) and (tmp_path / LEDGER).is_file()
    with output_file(ours) as fh:  # a rerun replaces its own file
        fh.write('{"again": 1}')
    assert ours.read_text() == '{"again": 1}'

    ours.write_text("edited by hand")  # once changed, it is the user's
    assert not is_ours(ours)
    with pytest.raises(BcdError, match="napari-bcd did not write it, or it changed since.*--overwrite"):
        check_output(ours)
    theirs = _user_file(tmp_path / "cohort.csv")
    with pytest.raises(BcdError, match="did not write it"), output_file(theirs) as fh:
        fh.write("x")
    assert theirs.read_bytes() == USER
    with output_file(theirs, "w", "any") as fh:  # --overwrite
        fh.write("replaced")
    assert theirs.read_text() == "replaced" and is_ours(theirs)


def test_links_are_never_written_through(tmp_path: Path) -> None:
    outside = _user_file(tmp_path / "elsewhere" / "precious.txt")
    link = tmp_path / "out" / "script.groovy"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(BcdError, match="is a link .*never writes through links"):
        check_output(link)
    with output_file(link, "w", "any") as fh:  # even with --overwrite: the link is replaced, not its target
        fh.write("new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert outside.read_bytes() == USER


def test_two_runs_into_one_new_name_cannot_both_succeed(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    with (pytest.raises(OutputConflict, match="written by another run while this one ran"),
          output_file(target, "w", "never") as fh):
        fh.write("mine")
        target.write_text("the other run's")  # it finished first
    assert target.read_text() == "the other run's"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.json.")]  # no temporary left


def test_concurrent_writers_into_one_name_one_wins(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    barrier = threading.Barrier(4)
    results: list[str] = []

    def writer(k: int) -> None:
        try:
            with output_path(target, "never") as tmp:
                tmp.write_text(f"writer {k}")
                barrier.wait()
            results.append("ok")
        except OutputConflict:
            results.append("conflict")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 3 + ["ok"]
    assert target.read_text().startswith("writer ")


# --- the commands --------------------------------------------------------------------------------------------------


def test_demo_never_replaces_a_users_files_and_replaces_its_own(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    stem = SAMPLE_SLIDE.stem
    user = _user_file(out / f"{stem}.geojson")
    assert main(["demo", "--headless", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{stem}.geojson already exists and it is never replaced" in err and "--overwrite" in err
    assert user.read_bytes() == USER
    assert not (out / f"{stem}.overview.png").exists()  # refused before any work

    user.unlink()
    png = _user_file(out / f"{stem}.overview.png")
    assert main(["demo", "--headless", "--out", str(out)]) == 2
    assert "did not write it" in capsys.readouterr().err
    assert png.read_bytes() == USER

    png.unlink()
    env = {k: os.environ.pop(k) for k in ("DISPLAY", "WAYLAND_DISPLAY") if k in os.environ}  # no screenshot: fast
    try:
        assert main(["demo", "--headless", "--out", str(out)]) == 0
        first = (out / f"{stem}.overview.png").read_bytes()
        assert main(["demo", "--headless", "--out", str(out)]) == 0  # its own files: replaced on a rerun
        assert (out / f"{stem}.overview.png").read_bytes()[:8] == first[:8]
    finally:
        os.environ.update(env)


def test_demo_replaces_its_own_classified_set_but_not_one_changed_since(tmp_path: Path, tiny_checkpoint: Path,
                                                                       capsys, monkeypatch) -> None:
    for k in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "demo"
    args = ["demo", "--headless", "--out", str(out), "--model", str(tiny_checkpoint), "--stride", "1"]
    assert main(args) == 0
    stem = SAMPLE_SLIDE.stem
    csv = out / f"{stem}.summary.csv"
    assert csv.is_file()
    assert main(args) == 0  # a rerun replaces the set it wrote
    csv.write_text("a pathologist's notes\n")  # changed since: the user's now
    assert main(args) == 2
    assert "never replaced" in capsys.readouterr().err
    assert csv.read_text() == "a pathologist's notes\n"
    assert main([*args, "--overwrite"]) == 0
    assert csv.read_text() != "a pathologist's notes\n"


def test_qupath_scripts_never_write_through_a_link(tmp_path: Path, capsys) -> None:
    outside = _user_file(tmp_path / "elsewhere.groovy")
    out = tmp_path / "scripts"
    out.mkdir()
    (out / "napari_bcd_classify.groovy").symlink_to(outside)
    assert main(["qupath-scripts", "--out", str(out)]) == 2
    assert "is a link" in capsys.readouterr().err
    assert not (out / "napari_bcd_export_annotations.groovy").exists()  # all checked before one is written
    assert main(["qupath-scripts", "--out", str(out), "--overwrite"]) == 0
    assert outside.read_bytes() == USER
    assert not (out / "napari_bcd_classify.groovy").is_symlink()
    assert "NAPARI_BCD" in (out / "napari_bcd_classify.groovy").read_text()


def test_classify_never_replaces_a_users_cohort_table(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    out = tmp_path / "out"
    table = _user_file(out / "cohort.csv")
    link = tmp_path / "copy.svs"
    link.symlink_to(SAMPLE_SLIDE)
    slides = [str(SAMPLE_SLIDE), str(link)]  # two slides: a cohort, so a table
    assert main(["classify", *slides, "--model", str(tiny_checkpoint), "--out", str(out), "--stride", "1"]) == 2
    assert "cohort.csv already exists and napari-bcd did not write it" in capsys.readouterr().err
    assert table.read_bytes() == USER
    assert not list(out.glob("*.labels.tif"))  # before any slide


def test_evaluate_never_replaces_a_users_report(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    ds = two_kinds_dataset(tmp_path / "ds", n=2)
    out = tmp_path / "eval"
    report = _user_file(out / "report.json")
    assert main(["evaluate", str(tiny_checkpoint), str(ds), "--out", str(out)]) == 2
    assert "report.json already exists and napari-bcd did not write it" in capsys.readouterr().err
    assert report.read_bytes() == USER


def test_reproduce_refuses_a_users_checkpoint_before_training(tmp_path: Path) -> None:
    from napari_bcd.train.iciar import read_iciar
    from napari_bcd.train.reproduce import iter_reproduce

    ds = read_iciar(two_kinds_dataset(tmp_path / "ds", n=4))
    out = tmp_path / "rep"
    user = _user_file(out / "paper-random.safetensors")
    with pytest.raises(CheckpointError, match="paper-random.safetensors already exists and napari-bcd did not"):
        next(iter_reproduce(ds, out, splits=("random",), backbone="timm:resnet18", backbone_weights=None))
    assert user.read_bytes() == USER


def test_a_checkpoint_written_meanwhile_is_kept_and_this_model_saved_beside_it(tmp_path: Path, tiny_model) -> None:
    from napari_bcd.model import load_checkpoint, save_checkpoint
    from napari_bcd.model.checkpoint import check_checkpoint_target
    from napari_bcd.train.save import _save_keeping

    out = tmp_path / "model.safetensors"
    check_checkpoint_target(out, False)  # the run's start: free
    other = save_checkpoint(tiny_model, path=out, overwrite=False)  # another run finishes first
    before = other.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tiny_model, path=out, overwrite=False)
    path, notes = _save_keeping(tiny_model, tiny_model.card, out, False)
    assert path.name == "model-2.safetensors" and out.read_bytes() == before
    assert "written by another run" in notes[0] and "model-2.safetensors" in notes[0]
    assert load_checkpoint(path).card.classes == tiny_model.card.classes


def test_a_file_size_limit_while_saving_weights_is_one_sentence_and_the_checkpoint_is_intact(
        tmp_path: Path, tiny_checkpoint: Path) -> None:
    """safetensors' writer reports the system's refusal as its own error type: said as the system's, in a sentence;
    the checkpoint being rewritten (``model decision``) is untouched and no temporary file is left."""
    import resource
    import shutil
    import signal
    import subprocess
    import sys

    from napari_bcd.model.card import checkpoint_paths

    ckpt = tmp_path / "m.safetensors"
    for src in checkpoint_paths(tiny_checkpoint):
        shutil.copy(src, tmp_path / src.name.replace(tiny_checkpoint.stem, "m"))
    before = ckpt.read_bytes()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    run = subprocess.run([sys.executable, "-m", "napari_bcd.cli", "model", "decision", str(ckpt), "--threshold",
                          "Invasive=0.4"], preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "the file grew past the size this system allows" in run.stderr and "Traceback" not in run.stderr
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def _tumour_regions(path: Path) -> Path:
    """A QuPath GeoJSON of one "Tumor" box on the bundled slide's tissue."""
    import json

    ring = [[900, 0], [1500, 0], [1500, 650], [900, 650], [900, 0]]
    regions = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "t1", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}
    path.write_text(json.dumps(regions))
    return path


def test_export_patches_refuses_a_table_it_cannot_add_to_before_any_patch(tmp_path: Path, capsys) -> None:
    """A binary microscopy_ground_truth.csv in --out was a traceback after the patches were written; now it is
    refused first, in a sentence, and left byte-identical with no patch written."""

    _tumour_regions(tmp_path / "regions.geojson")
    out = tmp_path / "out"
    table = _user_file(out / "microscopy_ground_truth.csv", bytes(range(256)) * 8)
    assert main(["export-patches", str(SAMPLE_SLIDE), str(tmp_path / "regions.geojson"), "--out", str(out),
                 "--field-um", "100"]) == 2
    assert "is not a UTF-8 CSV this export can add its patches to" in capsys.readouterr().err
    assert table.read_bytes() == bytes(range(256)) * 8
    assert sorted(p.name for p in out.iterdir()) == ["microscopy_ground_truth.csv"]


def test_export_patches_never_replaces_an_image_it_did_not_write(tmp_path: Path, capsys) -> None:
    """A user's image with a patch's name (in the patch's class folder, or another class folder the patch would
    take it from) is refused before any patch and left byte-identical; the export's own patches are replaced by
    the next export of the same slide, and --overwrite replaces the user's."""

    _tumour_regions(tmp_path / "regions.geojson")
    out = tmp_path / "out"
    args = ["export-patches", str(SAMPLE_SLIDE), str(tmp_path / "regions.geojson"), "--out", str(out),
            "--field-um", "100"]
    assert main(args) == 0
    first = sorted((out / "Tumor").iterdir())
    assert first
    assert main(args) == 0  # its own patches: replaced without a word
    capsys.readouterr()
    mine = _user_file(out / "Tumor" / first[0].name, b"my own image")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "napari-bcd did not write them" in err and "--overwrite" in err
    assert mine.read_bytes() == b"my own image"
    elsewhere = _user_file(out / "Stroma" / first[1].name, b"another of mine")  # a patch would take it away
    mine.unlink()
    assert main(args) == 2 and elsewhere.read_bytes() == b"another of mine"
    assert main([*args, "--overwrite"]) == 0
    assert not elsewhere.exists() and (out / "Tumor" / first[1].name).read_bytes()[:4] == b"\x89PNG"
