"""The core and the command line without napari or Qt (a server, a cluster node): `pip install napari-bcd`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import SAMPLE_SLIDE

# Run the real command line in a fresh interpreter where napari, Qt and magicgui cannot be imported,
# as on a machine where only the core is installed; report which of them got imported anyway.
BLOCKER = """
import sys, importlib.abc
BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy", "superqt")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked: a core-only install)", name=name)
sys.meta_path.insert(0, Block())
from napari_bcd.cli import main
code = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
print("LOADED=" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


def _core_only(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DISPLAY": ""})


def test_classify_needs_no_napari_and_no_qt(tmp_path: Path, tiny_checkpoint: Path) -> None:
    res = _core_only(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr
    assert "LOADED=\n" in res.stderr + "\n"  # none of napari, Qt or magicgui was imported
    summary = json.loads((tmp_path / "CMU-1-Small-Region.summary.json").read_text())
    assert summary["windows"] > 0


def test_the_demo_says_what_to_install_without_napari(tmp_path: Path, tiny_checkpoint: Path) -> None:
    res = _core_only(["demo", "--model", str(tiny_checkpoint)])
    assert res.returncode == 2 and 'pip install "napari-bcd[qt]"' in res.stderr and "Traceback" not in res.stderr
    res = _core_only(["demo", "--headless", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "d")])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "d" / "CMU-1-Small-Region.overview.png").is_file()


def test_a_models_card_and_the_package_names_cost_no_torch(tiny_checkpoint: Path) -> None:
    """What the docks and `model info` read first — the card, the public names — never imports torch."""
    code = f"""
import sys
import napari_bcd, napari_bcd.model, napari_bcd.review
from napari_bcd.model.card import read_card
card = read_card({str(tiny_checkpoint)!r})
assert card.classes and card.record is not None
rule = napari_bcd.review.DecisionRule(thresholds={{"Invasive": 0.3}})
print("TORCH=" + str("torch" in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TORCH=False" in out.stdout
