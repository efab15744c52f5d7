"""What a classification run did, as typed fields all the way down (the precision check, batching and int8 trial
are objects; JSON only at the file boundary, :meth:`RunRecord.info`): the CLI, cohorts and docks read these,
never message text or a dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..io.device_decode import DecodeChoice

if TYPE_CHECKING:
    from ..model.precision import PrecisionCheck
    from ..model.tuning import Batching, Int8Trial

__all__ = ["Progress", "RunRecord", "StainCheck"]


@dataclass(frozen=True)
class Progress:
    """One progress report.  ``stage`` is ``"tissue"``, ``"quality control"`` (``done``/``total``: chunks of a big
    slide read) or ``"classify"`` (windows)."""

    stage: str
    done: int
    total: int
    windows_per_s: float = 0.0
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def __str__(self) -> str:
        eta = f", ETA {self.eta_s:.0f} s" if self.eta_s is not None else ""
        return f"{self.stage}: {self.done}/{self.total} windows, {self.windows_per_s:.1f}/s{eta}"


@dataclass(frozen=True)
class StainCheck:
    """The slide's stain against the model's training images (:mod:`napari_bcd.stain`).

    ``slide``: the slide's stain statistics (:meth:`~napari_bcd.stain.StainStats.to_dict`), None when none were
    measured; ``distance``: how far they are from the card's (angles, strength ratios, the estimate's noise,
    whether it ``differs``), None without a reference; ``normalized``: the method that mapped every window to the
    training stain ("none" when none did); ``note``: why something is missing.  The JSON is made at the file
    boundary only (:meth:`to_dict`, :meth:`from_dict`); people read :meth:`warning`.
    """

    slide: dict | None = None
    distance: dict | None = None
    normalized: str = "none"
    note: str = ""

    @property
    def differs(self) -> bool:
        """Whether the slide's stain is unlike the training images' beyond the estimate's noise."""
        return bool((self.distance or {}).get("differs"))

    def warning(self, advice: str = "consider --stain-normalize macenko (or vahadane)") -> str:
        """The sentence a pathologist reads when the stain differs, else "" (``advice``: what to do, in the words
        of where it is read)."""
        if not self.differs:
            return ""
        d = self.distance or {}
        what = (f"hematoxylin {d['h_angle_deg']:.0f}° and eosin {d['e_angle_deg']:.0f}° apart, "
                f"strength x{d['h_ratio']:.2f} / x{d['e_ratio']:.2f}")
        if self.normalized in ("macenko", "vahadane"):
            return f"stain differs from the training set ({what}); normalised to it ({self.normalized.title()})"
        return f"stain differs from the training set ({what}): predictions may be unreliable; {advice}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"normalized": self.normalized}
        if self.slide is not None:
            out["slide"] = self.slide
        if self.distance is not None:
            out["distance"] = self.distance
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, d: dict | None) -> StainCheck:
        d = d or {}
        return cls(d.get("slide"), d.get("distance"), str(d.get("normalized") or "none"), str(d.get("note") or ""))


@dataclass(frozen=True)
class RunRecord:
    """One pass over a slide: how many windows, how fast, on what, decoded where, with which stain."""

    windows: int
    seconds: float
    device: str
    precision: str
    tissue_fraction: float
    min_tissue: float
    compiled: bool
    warmup_seconds: float
    decoded_tiles: int
    tiles_touched: int
    decode: DecodeChoice = field(default_factory=DecodeChoice)
    stain: StainCheck = field(default_factory=StainCheck)
    #: fp32 against the fast path on the first batch, when *auto* chose a fast path that needs checking.
    precision_check: PrecisionCheck | None = None
    #: With adaptive overlap: the windows full overlap would have classified (``windows`` is those used).
    candidate_windows: int | None = None
    #: With adaptive overlap: the windows left out but estimated from the classified ones around them.
    estimated_windows: int | None = None
    #: The CPU batch size and thread count, and the rates timed to choose them (:class:`~napari_bcd.model.tuning.
    #: BatchTuner`); None where they were given or on a GPU.
    batching: Batching | None = None
    #: CPU *auto*'s int8 trial on a long run: its check against fp32, both rates, and whether int8 was kept.
    int8_trial: Int8Trial | None = None

    @property
    def windows_per_s(self) -> float:
        return round(self.windows / self.seconds, 3) if self.seconds > 0 and self.windows else 0.0

    def info(self, decision: dict) -> dict[str, Any]:
        """The run as the summary's ``info`` JSON (the decision rule applied, with its counts, first)."""
        return {
            "decision": decision,
            "stain": self.stain.to_dict(),
            "windows": int(self.windows),
            "refine": None if self.candidate_windows is None else {
                "full_overlap_windows": self.candidate_windows,
                "share_used": round(self.windows / self.candidate_windows, 4) if self.candidate_windows else 1.0,
                "estimated_windows": int(self.estimated_windows or 0)},
            "seconds": round(self.seconds, 3),
            "windows_per_s": self.windows_per_s,
            "device": self.device,
            "precision": self.precision,
            "precision_check": self.precision_check.to_dict() if self.precision_check is not None else None,
            "int8_trial": self.int8_trial.to_dict() if self.int8_trial is not None else None,
            "batching": self.batching.to_dict() if self.batching is not None else None,
            "tissue_fraction": self.tissue_fraction,
            "min_tissue": self.min_tissue,
            "compiled": bool(self.compiled),
            "warmup_seconds": round(self.warmup_seconds, 3),
            "decoded_tiles": self.decoded_tiles,
            "decode": self.decode.text,
            "tiles_touched": self.tiles_touched,
        }
