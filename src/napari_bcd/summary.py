"""Per-slide summary: area and share of each class, and the slide-level call."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .classes import class_styles
from .engine import ClassMap
from .qc import REASON_WORDS

__all__ = ["ClassSummary", "Summary", "summarize"]


@dataclass(frozen=True)
class ClassSummary:
    """One class on one slide."""

    name: str
    display_name: str
    windows: int  # windows whose most likely class this is
    cells: int
    area_mm2: float
    percent_of_tissue: float
    mean_probability: float  # mean probability of this class over its cells


@dataclass(frozen=True)
class Summary:
    """What a pathologist reads first.

    ``call`` is the most severe class (Invasive > InSitu > Benign > Normal)
    covering more than ``min_area_mm2``; ``call_probability`` is the mean
    probability of that class over the cells labelled with it.
    """

    slide: str
    model: str
    classes: list[ClassSummary]
    tissue_area_mm2: float
    classified_area_mm2: float
    windows: int
    call: str | None
    call_display: str
    call_probability: float | None
    min_area_mm2: float
    info: dict = field(default_factory=dict)
    #: Cells the decision rule left uncertain (low confidence, low image quality, no threshold reached):
    #: counted here, never in a class or the call.
    uncertain_area_mm2: float = 0.0
    uncertain_percent_of_tissue: float = 0.0
    low_quality_area_mm2: float = 0.0
    #: The rule that turned probabilities into labels (thresholds, cut-offs), in words and as data.
    decision: str = "most probable class"
    decision_rule: dict = field(default_factory=dict)
    #: Said when the slide's stain differs from the model's training images (see :mod:`napari_bcd.stain`).
    stain_warning: str = ""
    #: How the call was made: ``"severity"`` (the most severe class present: the ICIAR classes) or ``"area"`` (the
    #: class covering the most tissue: classes without a known severity order, e.g. a WSInfer model's).
    call_by: str = "severity"
    #: Tissue quality control kept out of the map (:mod:`napari_bcd.qc`), in mm², in all and by reason
    #: (``{"pen": 2.3, "blur": 1.8}``): never in a class, an area share or the call.
    left_out_mm2: float = 0.0
    left_out: dict = field(default_factory=dict)
    #: Said when quality control left out most of the tissue, or the whole slide measures out of focus.
    qc_warning: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["slide", "class", "windows", "area_mm2", "percent_of_tissue", "mean_probability", "slide_call",
                    "call_probability", "decision"])
        call_p = "" if self.call_probability is None else f"{self.call_probability:.4f}"
        for c in self.classes:
            w.writerow([
                self.slide, c.name, c.windows, f"{c.area_mm2:.4f}", f"{c.percent_of_tissue:.2f}",
                f"{c.mean_probability:.4f}", self.call or "", call_p, self.decision,
            ])
        if self.uncertain_area_mm2:
            w.writerow([self.slide, "(uncertain)", "", f"{self.uncertain_area_mm2:.4f}",
                        f"{self.uncertain_percent_of_tissue:.2f}", "", self.call or "", call_p, self.decision])
        for reason, mm2 in self.left_out.items():
            w.writerow([self.slide, f"(left out: {reason})", "", f"{mm2:.4f}", "", "", self.call or "", call_p,
                        self.decision])
        return out.getvalue()

    @property
    def left_out_text(self) -> str:
        """``left out by quality control: 4.1 mm² (pen 2.3, blur 1.8)``, or "" when nothing was."""
        if not self.left_out_mm2:
            return ""
        parts = ", ".join(f"{REASON_WORDS.get(r, r)} {v:.2f}" for r, v in self.left_out.items())
        return f"left out by quality control: {self.left_out_mm2:.2f} mm² of tissue ({parts}), not in the call"

    def table(self, compact: bool = False) -> str:
        """A fixed-width table for terminals (or, ``compact``, the dock widget)."""
        if compact:
            lines = [f"{'class':<11}{'mm²':>8}{'% tissue':>9}{'p':>6}"]
            for c in self.classes:
                short = c.display_name.replace(" carcinoma", "")
                lines.append(f"{short:<11}{c.area_mm2:>8.3f}{c.percent_of_tissue:>8.1f}%{c.mean_probability:>6.2f}")
        else:
            lines = [f"{'class':<20} {'windows':>7} {'mm²':>9} {'% tissue':>9} {'mean p':>7}"]
            for c in self.classes:
                lines.append(
                    f"{c.display_name:<20} {c.windows:>7d} {c.area_mm2:>9.3f} {c.percent_of_tissue:>8.1f}% "
                    f"{c.mean_probability:>7.3f}"
                )
        if self.uncertain_area_mm2:
            lines.append(f"uncertain: {self.uncertain_area_mm2:.3f} mm² ({self.uncertain_percent_of_tissue:.1f}% of "
                         "classified tissue), not in the call")
        if self.left_out_text:
            lines.append(self.left_out_text)
        if self.decision != "most probable class":
            lines.append(f"rule: {self.decision}")
        if compact:  # the dock shows the call and the stain warning above the table, where they are seen
            return "\n".join(lines)
        for warning in (self.stain_warning, self.qc_warning):
            if warning:
                lines.append(f"WARNING: {warning}")
        lines.append(self.call_text)
        return "\n".join(lines)

    @property
    def call_text(self) -> str:
        """The slide call in words: ``slide call: Invasive carcinoma (p = 0.912)``, or why there is none."""
        if self.call is None:
            verdict = ("no tissue classified" if self.windows == 0
                       else f"no class covers more than {self.min_area_mm2} mm²")
            return f"slide call: none ({verdict})"
        how = "" if self.call_by == "severity" else "; the class covering most tissue: these classes have no severity"
        doubt = (f"; {self.uncertain_percent_of_tissue:.0f}% of the classified tissue uncertain"
                 if self.uncertain_area_mm2 else "")
        return f"slide call: {self.call_display} (p = {self.call_probability:.3f}{how}{doubt})"


def summarize(class_map: ClassMap, min_area_mm2: float = 0.0) -> Summary:
    """Summarise a ClassMap.

    Parameters
    ----------
    class_map
        From :func:`~napari_bcd.iter_classify`.
    min_area_mm2
        A class counts towards the slide-level call once it covers more than this.
    """
    g = class_map.grid
    cell_mm2 = g.cell_um[0] * g.cell_um[1] / 1e6

    labels = class_map.labels
    unsure = labels == class_map.uncertain_label
    classified = (labels > 0) & ~unsure
    # Only the part of a cell on the image counts (edge cells run past it), and "% of tissue" weighs each
    # cell by its tissue (the detector's fraction, which is 0 off the image).
    inside = (g.cell_inside_fraction(class_map.slide_shape) if all(class_map.slide_shape)
              else np.ones(labels.shape))
    tissue = np.clip(class_map.tissue, 0, 1)
    tissue_mm2 = float(tissue.sum() * cell_mm2)
    classified_mm2 = float((inside * classified).sum() * cell_mm2)
    classified_tissue = float((tissue * classified).sum())
    kh, kw = g.cells_per_window
    rows: list[ClassSummary] = []
    win_idx = np.argwhere(class_map.window_done)
    win_label = []
    for r, c in win_idx:
        p = np.nanmean(class_map.probs[r : r + kh, c : c + kw].reshape(-1, len(class_map.classes)), axis=0)
        win_label.append(int(np.nanargmax(p)) + 1 if np.isfinite(p).all() else 0)
    win_label_arr = np.asarray(win_label, int)
    styles = class_styles(class_map.classes)
    for i, (name, st) in enumerate(zip(class_map.classes, styles, strict=True)):
        cid = i + 1
        sel = labels == cid
        n = int(sel.sum())
        mean_p = float(np.nanmean(class_map.probs[sel][:, i])) if n else 0.0
        rows.append(
            ClassSummary(
                name=name,
                display_name=st.display_name,
                windows=int((win_label_arr == cid).sum()),
                cells=n,
                area_mm2=round(float(inside[sel].sum()) * cell_mm2, 6),
                percent_of_tissue=round(100.0 * float(tissue[sel].sum()) / classified_tissue,
                                        3) if classified_tissue else 0.0,
                mean_probability=round(mean_p, 6),
            )
        )
    call = None
    call_p = None
    by_name = {r.name: r for r in rows}
    if all(st.severity is not None for st in styles):  # the ICIAR classes: the most severe present
        order = [st.name for st in sorted(styles, key=lambda st: st.severity)]
        call_by = "severity"
    else:  # classes of their own (another lab's, a WSInfer model's) have no severity order: the most tissue
        order = [r.name for r in sorted(rows, key=lambda r: -r.area_mm2)]
        call_by = "area"
    for name in order:
        r = by_name[name]
        if r.cells and r.area_mm2 > min_area_mm2:
            call, call_p = name, r.mean_probability
            break
    display = by_name[call].display_name if call else "none"
    rule = class_map.rule
    all_tissue = classified_tissue + float((tissue * unsure).sum())
    left_out, qc_warning = _left_out(class_map, tissue * inside, cell_mm2, classified_tissue + float(
        (tissue * unsure).sum()))
    low_q = np.zeros(labels.shape, bool)
    if class_map.quality is not None and rule.min_quality > 0:
        low_q = unsure & np.isfinite(class_map.quality) & (class_map.quality < rule.min_quality)
    return Summary(
        slide=class_map.slide_name,
        model=class_map.model_name,
        classes=rows,
        tissue_area_mm2=round(tissue_mm2, 6),
        classified_area_mm2=round(classified_mm2, 6),
        windows=class_map.n_windows,
        call=call,
        call_display=display,
        call_probability=call_p,
        min_area_mm2=min_area_mm2,
        call_by=call_by,
        info=dict(class_map.info),
        uncertain_area_mm2=round(float(inside[unsure].sum()) * cell_mm2, 6),
        uncertain_percent_of_tissue=(round(100.0 * float(tissue[unsure].sum()) / all_tissue, 3) if all_tissue else 0.0),
        low_quality_area_mm2=round(float(inside[low_q].sum()) * cell_mm2, 6),
        decision=rule.describe(),
        decision_rule=rule.to_dict(),
        stain_warning=class_map.run.stain.warning() if class_map.run is not None else "",
        left_out_mm2=round(sum(left_out.values()), 6),
        left_out=left_out,
        qc_warning=qc_warning,
    )


def _left_out(class_map: ClassMap, tissue: np.ndarray, cell_mm2: float,
              kept_tissue: float) -> tuple[dict[str, float], str]:
    """mm² of tissue quality control kept out, by reason, and the warning when that is most of the slide."""
    from .qc import MOSTLY_FAILED, REASONS

    if class_map.qc is None or class_map.qc_cells is None:
        return {}, ""
    cells = class_map.qc_cells
    left = {r: round(float(tissue[cells == i + 1].sum()) * cell_mm2, 6) for i, r in enumerate(REASONS)}
    left = {r: v for r, v in left.items() if v > 0}
    out_tissue = sum(float(tissue[cells == i + 1].sum()) for i in range(len(REASONS)))
    share = out_tissue / (out_tissue + kept_tissue) if out_tissue + kept_tissue > 0 else 0.0
    words = []
    if share >= MOSTLY_FAILED:
        worst = max(left, key=left.get)
        words.append(f"quality control left out {share:.0%} of the tissue (mostly {REASON_WORDS[worst]}): the map "
                     "and the call rest on what is left; rescan the slide, or loosen the QC thresholds if these areas "
                     "are fit to classify")
    if class_map.qc.soft_slide:
        words.append(f"the whole slide measures soft (median sharpness {class_map.qc.reference_sharpness:.2f}, "
                     "in-focus H&E 1.5-3): it may be out of focus throughout, which a comparison within the slide "
                     "cannot see; check it at full resolution")
    return left, "; ".join(words)


def stain_warning(stain: dict | None, advice: str = "consider --stain-normalize macenko (or vahadane)") -> str:
    """The stain warning of a summary's ``info.stain`` JSON read back from a file
    (:meth:`~napari_bcd.engine.StainCheck.warning` of a run at hand)."""
    from .engine.record import StainCheck

    return StainCheck.from_dict(stain).warning(advice)
