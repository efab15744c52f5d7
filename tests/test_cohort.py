"""Cohorts: slides from folders and manifests, one table, resumable runs, and a Dask LocalCluster."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, write_pyramid
from napari_bcd.cli import main
from napari_bcd.cohort import CohortItem, collect_slides, iter_cohort, write_cohort_table
from napari_bcd.errors import BcdError
from napari_bcd.settings import ClassifySettings


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory, cmu_rgb) -> Path:
    """Five small pyramids cut from the real CMU slide (0.5 µm/px), one corrupt file, and a sub-folder."""
    d = tmp_path_factory.mktemp("cohort")
    (d / "sub").mkdir()
    for k in range(5):
        y, x = 200 + 150 * k, 150 * (k % 3)
        where = d / "sub" if k == 4 else d
        write_pyramid(where / f"case{k}.tif", np.ascontiguousarray(cmu_rgb[y : y + 1600, x : x + 1600]), levels=2)
    (d / "broken.svs").write_bytes(b"II*\x00not really a tiff")
    return d


def _labels(out: Path, stem: str) -> np.ndarray:
    import tifffile

    return tifffile.imread(out / f"{stem}.labels.tif")


def test_collect_slides_from_folders_and_a_manifest(cohort_dir: Path, tmp_path: Path) -> None:
    top = collect_slides([str(cohort_dir)])
    assert [Path(i.path).name for i in top] == ["broken.svs", "case0.tif", "case1.tif", "case2.tif", "case3.tif"]
    assert len(collect_slides([str(cohort_dir)], recursive=True)) == 6
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,mpp,id\n{cohort_dir / 'case0.tif'},0.5,A-1\n../{cohort_dir.name}/case1.tif,,\n")
    (tmp_path / "x").mkdir()
    items = collect_slides([], manifest=str(manifest), mpp=0.25)
    assert items[0] == CohortItem(str(cohort_dir / "case0.tif"), 0.5, "A-1") and items[0].stem == "A-1"
    assert items[1].mpp == 0.25 and items[1].stem == "case1"
    with pytest.raises(BcdError, match="same outputs"):
        collect_slides([str(cohort_dir / "case0.tif"), str(cohort_dir / "case0.tif")])
    (tmp_path / "bad.csv").write_text("file,mpp\na.svs,1\n")
    with pytest.raises(BcdError, match="'path' column"):
        collect_slides([], manifest=str(tmp_path / "bad.csv"))
    (tmp_path / "neg.csv").write_text("path,mpp\na.svs,-1\n")
    with pytest.raises(BcdError, match="line 2: mpp"):
        collect_slides([], manifest=str(tmp_path / "neg.csv"))
    with pytest.raises(BcdError, match="--recursive"):
        collect_slides([str(tmp_path / "x")])


def test_a_local_cluster_gives_the_single_process_outputs_and_survives_a_killed_worker(
    cohort_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster

    items = collect_slides([str(cohort_dir)], recursive=True)
    settings = ClassifySettings(stride=0.25)
    single = [r.row() for r in iter_cohort(items, tmp_path / "one", str(tiny_checkpoint), settings)]
    assert sorted(r["status"] for r in single) == ["done"] * 5 + ["failed"]
    assert "broken.svs" in next(r for r in single if r["status"] == "failed")["slide"]

    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
            Client(lc) as client:
        rows = []
        for result in iter_cohort(items, tmp_path / "two", str(tiny_checkpoint), settings, client=client):
            rows.append(result.row())
            if not killed:  # end a worker process that is in the middle of a slide
                busy = {w: keys for w, keys in client.processing().items() if keys}
                if busy:
                    pids = client.run(os.getpid)
                    victim = next(iter(busy))
                    os.kill(pids[victim], signal.SIGKILL)
                    killed.append(victim)
    assert killed, "no worker was busy when the first slide finished"
    assert sorted(r["id"] for r in rows) == sorted(i.stem for i in items)  # each slide once: none lost, none twice
    assert sorted(r["status"] for r in rows) == ["done"] * 5 + ["failed"]
    for item in items:
        if item.stem != "broken":
            assert np.array_equal(_labels(tmp_path / "one", item.stem), _labels(tmp_path / "two", item.stem))
            done = json.loads((tmp_path / "two" / f"{item.stem}.done.json").read_text())
            assert done["run"]["settings"]["stride"] == 0.25
    assert not [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]  # no lock or partial left
    # A second run skips every finished slide.
    again = [r.row() for r in iter_cohort(items, tmp_path / "two", str(tiny_checkpoint), settings)]
    assert sorted(r["status"] for r in again) == ["failed"] + ["skipped"] * 5
    assert {r["call"] for r in again if r["status"] == "skipped"} <= {r.get("call") for r in rows}


def test_cli_cohort_from_a_manifest_on_a_local_cluster_then_resumed(cohort_dir: Path, tiny_checkpoint: Path,
                                                                    tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,id\n" + "".join(f"{cohort_dir / f'case{k}.tif'},P{k}\n" for k in range(3)))
    out = tmp_path / "out"
    args = ["classify", "--manifest", str(manifest), "--model", str(tiny_checkpoint), "--out", str(out)]
    assert main([*args, "--cluster", "local:2"]) == 0
    cap = capsys.readouterr()
    assert "Dask cluster: 2 worker(s)" in cap.err
    import pyarrow.parquet as pq

    table = pq.read_table(out / "cohort.parquet").to_pydict()
    assert table["id"] == ["P0", "P1", "P2"] and table["status"] == ["done"] * 3
    assert all(table["Invasive_mm2"][k] is not None for k in range(3))
    (out / "P1.done.json").unlink()  # as if the run had been interrupted while writing P1 (its marker left)
    (out / ".P1.writing").touch()
    assert main(args) == 0
    cap = capsys.readouterr()
    assert cap.out.count("skipped") == 2 and "computed again" in cap.out
    rows = (out / "cohort.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows[1:]] == ["skipped", "done", "skipped"]


def test_cohort_table_columns(tmp_path: Path) -> None:
    rows = [{"id": "a", "slide": "a.svs", "status": "done", "call": "Invasive", "Invasive_mm2": 1.5, "seconds": 2.0},
            {"id": "b", "slide": "b.svs", "status": "failed", "error": "bad file", "seconds": 0.1}]
    csv_path, pq_path = write_cohort_table(rows, tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("id,slide,status,error,call") and lines[2].startswith("b,b.svs,failed,bad file,")
    import pyarrow.parquet as pq

    assert pq.read_table(pq_path).to_pydict()["Invasive_mm2"] == [1.5, None]


def test_sample_slide_still_runs_alone(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (result,) = iter_cohort([CohortItem(str(SAMPLE_SLIDE))], tmp_path, str(tiny_checkpoint), ClassifySettings())
    assert result.status == "done" and result.row()["windows"] > 0 and result.run.windows == result.row()["windows"]


def test_outputs_of_another_slide_or_of_the_user_are_never_replaced_silently(cohort_dir: Path, tiny_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    first = iter_cohort([CohortItem(str(cohort_dir / "case0.tif"))], out, str(tiny_checkpoint), ClassifySettings())
    assert [r.status for r in first] == ["done"]
    record = json.loads((out / "case0.done.json").read_text())
    assert record["source"]["path"] == str((cohort_dir / "case0.tif").resolve())
    # another slide with the same file name, classified into the same folder later
    other = tmp_path / "elsewhere" / "case0.tif"
    other.parent.mkdir()
    shutil.copy(cohort_dir / "case1.tif", other)
    (again,) = iter_cohort([CohortItem(str(other))], out, str(tiny_checkpoint), ClassifySettings())
    assert again.status == "failed" and "from another slide" in again.error and "--overwrite" in again.error
    assert json.loads((out / "case0.done.json").read_text()) == record  # untouched
    (replaced,) = iter_cohort([CohortItem(str(other))], out, str(tiny_checkpoint), ClassifySettings(), overwrite=True)
    assert replaced.status == "done"
    # files of the user's own that carry our output names, with no done-record
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "case2.geojson").write_text("my own annotations")
    (theirs,) = iter_cohort([CohortItem(str(cohort_dir / "case2.tif"))], mine, str(tiny_checkpoint),
                            ClassifySettings())
    assert theirs.status == "failed" and "not written by napari-bcd" in theirs.error
    assert (mine / "case2.geojson").read_text() == "my own annotations"


@pytest.mark.parametrize(("text", "words"), [
    ("path,id\ncase0.tif,../escape\n", "cannot name output files"),
    ("path,id\ncase0.tif,a/b\n", "cannot name output files"),
    ("path,id\ncase0.tif,.hidden\n", "cannot name output files"),
    ("path;id\ncase0.tif;P0\n", "semicolons"),
    ("path,id\n", "no slides"),
    ("path,id\ncase0.tif,P0,extra\n", "more fields"),
])
def test_manifests_that_would_write_elsewhere_or_misread_are_refused(tmp_path: Path, text: str, words: str) -> None:
    from napari_bcd.cohort import read_manifest
    from napari_bcd.errors import BcdError

    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(BcdError, match=words):
        read_manifest(manifest)


def test_a_bogus_cluster_address_is_named() -> None:
    from napari_bcd.cohort import connect
    from napari_bcd.errors import BcdError

    with pytest.raises(BcdError, match="neither local:N nor a scheduler address"):
        connect("nonsense")
    with pytest.raises(BcdError, match="local:N needs a number"):
        connect("local:x")


def test_its_own_outputs_are_never_taken_for_slides(tiny_checkpoint, tmp_path: Path) -> None:
    """Issue 40: a folder classified into itself, then classified again, does not classify the label maps; one
    named on the command line (or renamed) is refused in a sentence."""
    import shutil

    from napari_bcd.cli import main
    from napari_bcd.errors import SlideError
    from napari_bcd.io import open_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(SAMPLE_SLIDE, folder / "a.svs")
    args = ["--model", str(tiny_checkpoint), "--precision", "fp32"]
    assert main(["classify", str(folder), "--out", str(folder), *args]) == 0
    labels = folder / "a.labels.tif"
    assert labels.is_file()
    assert main(["classify", str(folder), "--out", str(folder), *args]) == 0  # skipped: only a.svs is a slide
    assert not (folder / "a.labels.labels.tif").exists()
    renamed = shutil.copy(labels, tmp_path / "copy.tif")
    with pytest.raises(SlideError, match="a map napari-bcd wrote"):
        open_slide(renamed)
