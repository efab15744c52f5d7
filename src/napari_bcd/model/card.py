"""The model card: everything needed to use a checkpoint correctly, as JSON."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BcdError, CheckpointError
from .preprocessing import Preprocessing

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .record import TrainingRecord

__all__ = ["CARD_FORMAT", "ICIAR_FIELD_UM", "ModelCard", "checkpoint_paths", "read_card"]

CARD_FORMAT = "napari-bcd-model/1"
#: The paper's input: an ICIAR photo, 1536 x 2048 px at 0.42 µm/px, resized
#: to 256 x 256.  (h, w) in µm.
ICIAR_FIELD_UM: tuple[float, float] = (1536 * 0.42, 2048 * 0.42)


@dataclass(frozen=True)
class ModelCard:
    """What one checkpoint is and how it was made.

    Attributes
    ----------
    classes
        Class names in output order: the training data's (no default: a card always names its classes).
    backbone
        ``"resnet152v2"`` (the paper's Keras-layout network) or ``"timm:<name>"``.
    backbone_args
        How the backbone was built beyond its name (timm's ``create_model`` arguments).
    backbone_weights
        Where the backbone's starting weights came from (``"imagenet-keras"``,
        ``"timm-pretrained"``, a file name and hash, or ``"random"``).
    head
        The head's description (type, activations, feature map size).
    input_px
        Network input size ``(h, w)`` in pixels.
    field_um
        Physical extent ``(h, w)`` in µm that one input shows.
    preprocessing
        Pixel normalisation.
    training, metrics
        Provenance (data, split, hyper-parameters, curves) and validation figures.
    stain
        The training images' stain statistics (:class:`~napari_bcd.stain.StainStats`),
        the reference slides are compared with and normalised to; empty when unknown.
    decision
        How probabilities become labels: per-class thresholds and the
        uncertainty cut-offs (:class:`~napari_bcd.review.DecisionRule`); empty
        = the most probable class.
    """

    classes: tuple[str, ...] = ()
    backbone: str = "resnet152v2"
    backbone_weights: str = "imagenet-keras"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=lambda: {"type": "table2", "activation": "relu"})
    input_px: tuple[int, int] = (256, 256)
    field_um: tuple[float, float] = ICIAR_FIELD_UM
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    name: str = "untrained"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)
    stain: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    weights_sha256: str = ""
    created: str = ""
    format: str = CARD_FORMAT

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
            object.__setattr__(self, "input_px", tuple(int(v) for v in self.input_px))
            object.__setattr__(self, "field_um", tuple(float(v) for v in self.field_um))
            if isinstance(self.preprocessing, dict):
                object.__setattr__(self, "preprocessing", Preprocessing.from_dict(self.preprocessing))
            elif isinstance(self.preprocessing, str):  # "tf", "unit", "imagenet" written by hand
                object.__setattr__(self, "preprocessing", Preprocessing.parse(self.preprocessing))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"The model card has a malformed value ({err}).") from err
        except BcdError as err:
            raise CheckpointError(f"The model card's preprocessing is not usable: {err}") from err
        problems = []
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            problems.append(f"classes must be two or more distinct names, got {list(self.classes)}")
        if len(self.input_px) != 2 or min(self.input_px) < 1:
            problems.append(f"input_px must be two positive sizes, got {list(self.input_px)}")
        if len(self.field_um) != 2 or not all(math.isfinite(v) and v > 0 for v in self.field_um):
            problems.append(f"field_um must be two positive µm, got {list(self.field_um)}")
        if not isinstance(self.preprocessing, Preprocessing):
            problems.append(f"preprocessing must be an object or a name, got {self.preprocessing!r}")
        if self.decision:
            from ..decision import DecisionRule

            try:
                rule = DecisionRule.from_dict(self.decision)
                rule.check_classes(self.classes)
                object.__setattr__(self, "decision", rule.to_dict())
            except BcdError as err:
                problems.append(f"decision: {err}")
        if problems:
            raise CheckpointError("The model card is not usable: " + "; ".join(problems) + ".")

    @property
    def record(self) -> TrainingRecord:
        """The ``training`` object as a typed :class:`~napari_bcd.model.record.TrainingRecord`."""
        from .record import TrainingRecord

        return TrainingRecord.from_dict(self.training if isinstance(self.training, dict) else None)

    @property
    def mpp(self) -> tuple[float, float]:
        """µm per input pixel, ``(y, x)``: the resolution the network sees."""
        return (self.field_um[0] / self.input_px[0], self.field_um[1] / self.input_px[1])

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["mpp"] = list(self.mpp)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_jsonable)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        if not isinstance(d, dict) or d.get("format") != CARD_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(
                f"This is not a napari-bcd model card (format {found!r}, expected {CARD_FORMAT!r})."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"The model card is not valid JSON: {err}") from err

    def stamped(self, weights_sha256: str) -> ModelCard:
        """A copy with the weights hash, package version and creation time set."""
        from .._version import __version__

        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return self.replace(weights_sha256=weights_sha256, package_version=__version__, created=now)

    def describe(self) -> str:
        """A few lines for people: classes, backbone, field, metrics."""
        lines = [
            f"model     {self.name}",
            f"classes   {', '.join(self.classes)}",
            f"backbone  {self.backbone} ({self.backbone_weights})",
            f"input     {self.input_px[0]}x{self.input_px[1]} px showing "
            f"{self.field_um[0]:.0f}x{self.field_um[1]:.0f} µm ({self.mpp[1]:.2f} µm/px)",
            f"pixels    {self.preprocessing.describe()}",
        ]
        record = self.record
        if record.protocol_name:
            lines.append(f"trained   protocol {record.protocol_name}, {record.split_kind}")
        if record.validation is False:
            lines.append("metrics   none: trained without validation data")
        lines += self._validation_lines()
        if self.decision:
            from ..decision import DecisionRule

            lines.append(f"decision  {DecisionRule.from_dict(self.decision).describe()}")
        parent = record.parent
        if parent:
            lines.append(f"retrained from {parent.get('name', '')} ({parent.get('path', '')}), "
                         f"{len((record.retrain or {}).get('corrections', []))} corrected cells")
        return "\n".join(lines)

    def _validation_lines(self) -> list[str]:
        """The figures, with how they were measured, in words (no jargon)."""
        m = self.metrics
        acc = m.get("accuracy")
        if not isinstance(acc, int | float):
            return []
        optimistic = bool(m.get("optimistic", not (self.record.split or {}).get("grouped", False)))
        how = (self.record.split or {}).get("description") or self.record.split_kind
        if optimistic:
            lines = [f"accuracy  {acc:.1%} on {how}"]
            if "optimistic" not in str(how):
                lines.append("          optimistic: validation images share patients with training; expect less on "
                             "new patients")
        else:
            lines = [f"accuracy  {acc:.1%} expected on new patients ({how})"]
        if isinstance(m.get("fold_accuracy_mean"), int | float):
            lines.append(f"          across folds {m['fold_accuracy_mean']:.1%} ± {m.get('fold_accuracy_sd', 0):.1%}")
        if isinstance(m.get("macro_f1"), int | float):
            lines.append(f"macro F1  {m['macro_f1']:.4f}")
        if isinstance(m.get("probe_accuracy"), int | float):
            lines.append(f"simple classifier (logistic regression on the averaged features) {m['probe_accuracy']:.1%}")
        shipped = (self.record.extra.get("selection") or {}).get("shipped")
        if shipped == "probe":
            lines.append("this model IS that simple classifier: training the head further did not beat it on unseen "
                         "images")
        return lines


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights.safetensors, card.json)`` for a checkpoint named by either file or its stem."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def is_wsinfer_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a WSInfer model folder (``config.json`` and ``torchscript_model.pt``; see
    :mod:`~.wsinfer`)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "torchscript_model.pt").is_file()


def refuse_other_formats(path: str | os.PathLike[str]) -> None:
    """Name the formats that are not napari-bcd checkpoints, with what to do instead."""
    p = Path(path)
    try:
        p.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise CheckpointError(f"{path} is a symbolic link loop ({err}); give the checkpoint's real path.") from err
    if p.is_dir():
        raise CheckpointError(f"{path} is a folder, and not a WSInfer model folder (config.json and "
                              "torchscript_model.pt); give the checkpoint's .safetensors file (or its .json card).")
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"):
        raise CheckpointError(f"{path} is a PyTorch pickle, which napari-bcd never loads (it can run code). Use a "
                              "napari-bcd checkpoint (.safetensors + .json), or convert the weights to safetensors.")
    if suffix in (".h5", ".keras", ".hdf5"):
        raise CheckpointError(f"{path} is a Keras file. napari-bcd checkpoints are .safetensors + .json; for the "
                              "ImageNet backbone weights use `napari-bcd weights import`.")


def read_card_file(path: Path) -> ModelCard:
    """A card from its JSON file; errors name the file."""
    try:
        return ModelCard.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"The model card {path} cannot be read ({err}).") from err
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """A checkpoint's card alone: its JSON, else the copy in the safetensors header. No torch, no weights.

    For showing a model (a dock's model box, ``model info``) before loading
    it; :func:`~napari_bcd.model.load_checkpoint` still checks card against
    weights when the model is loaded.

    Raises
    ------
    CheckpointError
    """

    if is_wsinfer_folder(path):  # a WSInfer model folder: its config.json says what the card would
        from .wsinfer_config import wsinfer_card_fields

        return ModelCard(**wsinfer_card_fields(path))
    refuse_other_formats(path)
    weights, card = checkpoint_paths(path)
    if card.is_file():
        outside = read_card_file(card)
        if weights.is_file():
            try:
                return newer_card(outside, embedded_card_text(weights), card.name)
            except CheckpointError:
                return outside  # a damaged header: loading the weights will say so
        return outside
    if not weights.is_file():
        raise CheckpointError(f"No checkpoint weights at {weights}. Give a .safetensors file written by napari-bcd.")
    try:
        return ModelCard.from_json(embedded_card_text(weights))
    except CheckpointError as err:
        raise CheckpointError(f"The card inside {weights}: {err}") from err


def embedded_card_text(weights: Path) -> str:
    """The card in a safetensors file's header (read without torch)."""
    import struct

    try:
        with open(weights, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
        return header["__metadata__"]["napari_bcd.card"]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise CheckpointError(f"{weights} holds no napari-bcd model card ({err}).") from err


def newer_card(outside: ModelCard, embedded: str | None, json_name: str) -> ModelCard:
    """The JSON card, unless the card inside the weights is for the same weights and newer.

    A save writes the weights (carrying the card) first and the JSON second, so a save interrupted
    between the two (``model decision`` killed, a full disk) leaves the newer card inside the weights.
    """
    if not embedded:
        return outside
    try:
        inner = ModelCard.from_json(embedded)
    except CheckpointError:
        return outside
    a, b = inner.to_dict(), outside.to_dict()
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    if (inner.weights_sha256 and inner.weights_sha256 == outside.weights_sha256 and inner.created
            and outside.created and inner.created > outside.created and changed
            and changed <= {"decision", "created", "package_version"}):  # what a decision save changes
        log.warning("%s is older than the card inside its weights (an interrupted save): using the newer card. "
                    "Save the decision again to bring %s up to date.", json_name, json_name)
        return inner
    return outside
