"""The module map of docs/architecture.md as a contract: every import (lazy ones included) goes down the layers,
the command line and the docks stand side by side, napari and Qt stay in the front ends, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_bcd"

#: The layers, lowest first: a module imports only from layers below its own (docs/architecture.md).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "_version", "_lazy", "_progress"),
    ("_fileio", "geometry", "classes", "tissue", "stain"),
    ("config", "_download", "decision", "annotations"),
    ("settings",),
    ("io",),
    ("tiling",),
    ("windows", "quality"),
    ("qc",),
    ("model",),
    ("engine",),
    ("train",),
    ("summary", "done"),
    ("export",),
    ("layers", "review", "cohort"),
    ("app",),
    ("cli", "demo", "demo_viewer", "_reader", "_writer", "_sample_data", "_widgets"),
)
#: Side by side in the front ends: neither imports the other.
APART = ({"cli", "demo", "demo_viewer"}, {"_widgets"})
#: Packages only the front ends that show a window may import.
GUI = ("napari", "qtpy", "magicgui", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6")
GUI_ALLOWED = {"_widgets", "demo_viewer"}

RANK = {unit: r for r, units in enumerate(LAYERS) for unit in units}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(module -> napari_bcd modules it imports, module -> other top-level packages it imports)``, every import
    statement counted wherever it stands (functions too), except those under ``if TYPE_CHECKING:``."""
    files = {_module(p): p for p in root.rglob("*.py")}
    inner: dict[str, set[str]] = {}
    outer: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for sub in node.body for n in ast.walk(sub)}
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or "" if node.level == 0 else ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        inner[mod] = {m for m in found if m.split(".")[0] == "napari_bcd" and m != mod}
        outer[mod] = {m.split(".")[0] for m in found if m.split(".")[0] != "napari_bcd"}
    return inner, outer


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(inner: dict[str, set[str]], outer: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the contract, in words."""
    bad = []
    for mod, targets in inner.items():
        a = _unit(mod)
        if not a:  # the package's __init__: lazy names only
            bad += [f"{mod} imports {t} at once (use the lazy map)" for t in targets
                    if _unit(t) not in ("_lazy", "_version")]
            continue
        if a not in RANK:
            bad.append(f"{mod} is in no layer of the contract: add it to LAYERS (and docs/architecture.md)")
            continue
        for t in targets:
            b = _unit(t)
            if b in ("", a):
                continue
            if b not in RANK:
                bad.append(f"{mod} imports {t}, which is in no layer")
            elif RANK[b] > RANK[a] or (RANK[b] == RANK[a] and RANK[a] < len(LAYERS) - 1):
                bad.append(f"{mod} imports {t}: an upward import ({a} is below {b})")
            elif any((a in one and b in other) or (b in one and a in other) for one, other in [APART]):
                bad.append(f"{mod} imports {t}: the command line and the docks stand side by side")
    for mod, packages in outer.items():
        gui = sorted(p for p in packages if p in GUI)
        if gui and _unit(mod) not in GUI_ALLOWED:
            bad.append(f"{mod} imports {', '.join(gui)}: only {', '.join(sorted(GUI_ALLOWED))} may")
    return bad


def cycles(inner: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles between modules (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in inner.get(v, ()):
            if w not in inner:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in inner:
        if v not in index:
            visit(v)
    return out


def test_every_import_goes_down_the_layers() -> None:
    inner, outer = import_graph()
    assert len(inner) > 100  # the whole package was read
    assert violations(inner, outer) == []


def test_no_import_cycles() -> None:
    inner, _ = import_graph()
    assert cycles(inner) == []


@pytest.mark.parametrize(("mod", "target", "why"), [
    ("napari_bcd.engine.run", "napari_bcd.cli.classify", "upward"),
    ("napari_bcd.model.card", "napari_bcd.train.iciar", "upward"),
    ("napari_bcd.cli.classify", "napari_bcd._widgets.classify", "side by side"),
    ("napari_bcd._widgets.classify", "napari_bcd.cli.options", "side by side"),
])
def test_the_contract_catches_an_added_import(mod: str, target: str, why: str) -> None:
    inner, outer = import_graph()
    inner[mod] = {*inner[mod], target}
    found = violations(inner, outer)
    assert len(found) == 1 and why in found[0] and mod in found[0]


def test_the_contract_catches_gui_in_the_core_and_a_cycle() -> None:
    inner, outer = import_graph()
    outer["napari_bcd.engine.run"] = {*outer["napari_bcd.engine.run"], "qtpy"}
    assert any("qtpy" in v for v in violations(inner, outer))
    inner["napari_bcd.train.save"] = {*inner["napari_bcd.train.save"], "napari_bcd.train.finetune"}
    assert ["napari_bcd.train.finetune", "napari_bcd.train.save"] in cycles(inner)
