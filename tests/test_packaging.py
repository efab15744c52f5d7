"""What the source distribution carries: the tests with their data, the QuPath scripts, the docs."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="run from a checkout")
def test_the_sdist_holds_the_tests_their_data_and_the_qupath_scripts(tmp_path: Path, monkeypatch) -> None:
    from setuptools import build_meta

    monkeypatch.chdir(ROOT)
    name = build_meta.build_sdist(str(tmp_path))
    with tarfile.open(tmp_path / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    for needed in ("tests/conftest.py", "tests/data/SOURCES.md", "tests/data/stardist-histo-500x300.jpg",
                   "src/napari_bcd/qupath/napari_bcd_classify.groovy",
                   "src/napari_bcd/qupath/napari_bcd_export_annotations.groovy",
                   "src/napari_bcd/data/CMU-1-Small-Region.svs", "docs/architecture.md", "benchmarks/bench_cpu.py"):
        assert needed in members, needed
    assert not [m for m in members if m.endswith(".pyc")]


def test_qupath_scripts_are_copied_out_of_the_package(tmp_path: Path, capsys) -> None:
    from napari_bcd.cli import main

    assert main(["qupath-scripts", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".napari-bcd-written.json", "napari_bcd_classify.groovy",
                                                          "napari_bcd_export_annotations.groovy"]
    assert "NAPARI_BCD" in capsys.readouterr().out
    (tmp_path / "napari_bcd_classify.groovy").write_text("my edits")
    assert main(["qupath-scripts", "--out", str(tmp_path)]) == 2  # never replaces the user's edited copy
    assert (tmp_path / "napari_bcd_classify.groovy").read_text() == "my edits"
