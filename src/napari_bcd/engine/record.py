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
    """One progress report.  ``stage`` is ``"tissue"`` or ``"classify"``."""

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

    ``data`` is the JSON the summary carries; ``normalized`` the method that
    mapped every window to the training stain ("none" when none did);
    ``differs`` whether the stain is unlike the training images'.
    """

    data: dict = field(default_factory=dict)
    normalized: str = "none"
    differs: bool = False


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
            "stain": self.stain.data,
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
