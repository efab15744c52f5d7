"""Checkpoints: safetensors weights + a JSON model card, never a pickle.

``save_checkpoint(model, card, "my_model.safetensors")`` writes
``my_model.safetensors`` (the weights; the card is embedded in its header too)
and ``my_model.json`` (the card, for people and tools).  Both are written
atomically.  Loading checks that the card fits the weights: the backbone's
tensor names and shapes, the number of classes, and the weights' SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._fileio import OutputConflict, check_output, is_ours, output_file, output_path
from ..config import remember_weights, verified_weights
from ..errors import BcdError, CheckpointError
from .card import ModelCard, checkpoint_paths, is_wsinfer_folder, newer_card, read_card_file, refuse_other_formats
from .classifier import Classifier, build_classifier

if TYPE_CHECKING:
    from ..decision import DecisionRule

__all__ = [
    "check_checkpoint_target",
    "checkpoint_paths",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "save_decision",
    "weights_sha256",
]

log = logging.getLogger(__name__)
_META_KEY = "napari_bcd.card"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_checkpoint_target(path: str | os.PathLike[str], overwrite: bool | str | None = False) -> Path:
    """Refuse, before any work, a checkpoint name that cannot or must not be written; returns the weights path.

    Raises
    ------
    CheckpointError
        When the name is a folder, lies under a file, or an existing
        checkpoint would be replaced without ``overwrite`` (``"ours"``: only
        one napari-bcd wrote and nobody changed since may be replaced).
    """
    raw = Path(path)
    if raw.is_dir():
        raise CheckpointError(f"{raw} is a folder. Give a file name for the model, e.g. {raw / 'model.safetensors'}.")
    weights, card = checkpoint_paths(raw)
    for parent in weights.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{weights} cannot be written: {parent} is a file, not a folder.")
            break
    for p in (weights, card):
        if os.path.lexists(p) and not (overwrite is True or (overwrite == "ours" and is_ours(p))):
            advice = "" if overwrite is None else ", or pass --overwrite to replace it"
            why = " and napari-bcd did not write it (or it changed since)" if overwrite == "ours" else ""
            raise CheckpointError(f"{p} already exists{why}. Choose another name{advice}.")
    return weights


def save_checkpoint(
    model: Classifier,
    card: ModelCard | None = None,
    path: str | os.PathLike[str] = "model.safetensors",
    *,
    overwrite: bool | str = True,
) -> Path:
    """Write the model's weights (safetensors) and card (JSON) atomically.

    The weights go first and carry the card in their header; the JSON follows.
    An interruption between the two leaves new weights beside an old JSON, which
    :func:`load_checkpoint` recognises (the embedded card matches the weights)
    and resolves with the embedded card: the pair is consistent by construction.

    Parameters
    ----------
    model
        The classifier.
    card
        Its card; defaults to ``model.card``.  The weights hash, package
        version and time are filled in.
    path
        ``NAME.safetensors`` (``NAME.json`` is written beside it).
    overwrite
        Replace an existing checkpoint of that name: True (any), ``"ours"`` (only one napari-bcd wrote and
        nobody changed since) or False (never: a checkpoint that appears while the model trains is kept and
        this one refused with :class:`CheckpointError`, never two runs reporting one file).

    Returns
    -------
    Path of the ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    weights, card_path = checkpoint_paths(path)
    replace = "any" if overwrite is True else "ours" if overwrite == "ours" else "never"
    try:
        for p in (weights, card_path):
            check_output(p, replace)
    except BcdError as err:
        raise CheckpointError(str(err)) from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card = (card or model.card).stamped(weights_sha256(state))
    try:
        with output_path(weights, replace) as tmp:
            try:
                save_file(state, str(tmp), metadata={_META_KEY: card.to_json()})
            except Exception as err:  # safetensors' own error type wraps the system's: say it as the system's
                raise _as_os_error(err, weights) from err
    except OutputConflict as err:
        raise CheckpointError(str(err)) from None
    with output_file(card_path, "w", "any") as fh:  # the card of the weights just written
        fh.write(card.to_json())
    model.card = card
    model.source_path, model.weights_sha256 = str(weights), card.weights_sha256  # it is this checkpoint now
    log.info("Saved checkpoint %s", weights)
    return weights


def _as_os_error(err: Exception, path: Path) -> Exception:
    """safetensors reports a full disk, a file-size limit or a read-only file system as its own ``SafetensorError``
    ("I/O error: No space left on device (os error 28)"): the :class:`OSError` it is, said in one sentence."""
    import re

    if isinstance(err, OSError):
        return err
    m = re.search(r"(?:\bcode:|\bos error)\s*(\d+)", str(err))
    if m is None:
        return err
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def save_decision(path: str | os.PathLike[str], rule: DecisionRule | None) -> Path:
    """Store a decision rule (thresholds, uncertainty cut-offs) in a checkpoint's card; the weights are unchanged.

    ``rule`` is a :class:`~napari_bcd.decision.DecisionRule` (or None to clear it).  The one way the CLI's
    ``model decision`` and the Review dock's *Save in the model* do it.
    """
    model = load_checkpoint(path)
    decision = rule.to_dict() if rule is not None and not rule.is_default else {}
    return save_checkpoint(model, model.card.replace(decision=decision), path, overwrite=True)


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Classifier:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path
        The ``.safetensors`` file, its ``.json`` card, or their common stem; or a WSInfer model folder
        (``config.json`` and ``torchscript_model.pt``, :mod:`~.wsinfer`).
    device
        Where to put the model.

    Raises
    ------
    CheckpointError
        When a file is missing or corrupt, or the card does not match the weights.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if is_wsinfer_folder(path):  # a WSInfer model folder (QuPath's, the zoo's, or exported here)
        from .wsinfer import load_wsinfer

        return load_wsinfer(path, device=device)
    refuse_other_formats(path)
    weights, card_path = checkpoint_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"No checkpoint weights at {weights}. Give a .safetensors file written by napari-bcd.")
    try:
        with safe_open(str(weights), framework="pt") as f:
            embedded = (f.metadata() or {}).get(_META_KEY)
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err}). It may be truncated.") from err
    got = verified_weights(weights)
    if got is None:  # not verified before, or changed since: check and hash it (0.2 s for ResNet152V2)
        got = _verify(state, weights)
        remember_weights(weights, got)
    if card_path.is_file():
        card = newer_card(read_card_file(card_path), embedded, card_path.name)
        if card.weights_sha256 and card.weights_sha256 != got and embedded:
            inner_card = _embedded_card(embedded, weights)
            if inner_card.weights_sha256 == got:
                # New weights beside an old JSON: an interrupted save, or weights copied from another
                # checkpoint. The weights file describes itself; its card is the truth.
                log.warning("%s does not match %s (an interrupted save, or weights copied from another model); "
                            "using the card stored inside %s.", card_path.name, weights.name, weights.name)
                card = inner_card
    elif embedded:
        log.warning("%s is missing; using the card embedded in %s", card_path, weights.name)
        card = _embedded_card(embedded, weights)
    else:
        raise CheckpointError(f"{weights} has no model card: {card_path} is missing.")
    if card.weights_sha256 and card.weights_sha256 != got:
        raise CheckpointError(
            f"The card {card_path.name} does not match {weights.name}: its weights hash is "
            f"{card.weights_sha256[:12]}…, the file's is {got[:12]}…. One of the two was changed or replaced; "
            "use the pair written together."
        )
    if embedded:
        try:
            inner = json.loads(embedded)
        except ValueError:
            inner = {}
        for key in ("backbone", "classes"):
            if key in inner and list(_as_list(inner[key])) != list(_as_list(card.to_dict()[key])):
                raise CheckpointError(
                    f"The card {card_path.name} says {key} = {card.to_dict()[key]!r}, but the weights were saved "
                    f"with {inner[key]!r}. Use the card written with these weights."
                )
    try:
        model = _build_for(card, state)
    except BcdError as err:
        raise CheckpointError(f"Cannot rebuild the network the card describes: {err}") from err
    except RuntimeError as err:
        raise CheckpointError(
            f"The weights in {weights.name} do not fit the card's network ({card.backbone}, "
            f"{len(card.classes)} classes): {str(err).splitlines()[0]} "
            "The card and weights belong to different models."
        ) from err
    model.card = card
    model.source_path, model.weights_sha256 = str(weights), got  # a map names the checkpoint that made it
    return model.to(device).eval()


def _verify(state: dict[str, torch.Tensor], weights: Path) -> str:
    """The weights hash of ``state``, refusing NaN or infinite values (a tensor whose sum is finite has none)."""
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(v.sum().isfinite())
              and not bool(torch.isfinite(v).all())]  # the sum may overflow: then every value is checked
    if broken:
        raise CheckpointError(
            f"{weights} holds NaN or infinite values in {len(broken)} tensor(s) "
            f"({', '.join(broken[:3])}{', …' if len(broken) > 3 else ''}): the "
            "training diverged or the file is damaged. Use another checkpoint, or train again.")
    return weights_sha256(state)


def _embedded_card(text: str, weights: Path) -> ModelCard:
    try:
        return ModelCard.from_json(text)
    except CheckpointError as err:
        raise CheckpointError(f"The card inside {weights}: {err}") from err


def _build_for(card: ModelCard, state: dict[str, torch.Tensor]) -> Classifier:
    """Build the card's network and give it ``state``.

    The network is built on the meta device and takes the loaded tensors
    as its own (``assign=True``): no random initialisation to throw away and
    no second copy of the weights, which halves peak memory for ResNet152V2.
    Networks with buffers that are not saved fall back to a normal build.
    """
    kwargs = {
        "backbone_weights": None,
        "classes": card.classes,
        "input_px": card.input_px,
        "preprocessing": card.preprocessing,
        "card": card,
    }
    try:
        with torch.device("meta"):
            model = build_classifier(card.backbone, **kwargs)
    except (ImportError, RuntimeError) as err:  # the network's code, not the weights: say which
        hint = (" torchvision does not match this torch (e.g. a CUDA build beside a CPU one): install the two "
                "together from one index, e.g. pip install torch==2.14.1 torchvision==0.29.1 --index-url "
                "https://download.pytorch.org/whl/cpu" if "torchvision" in str(err) else "")
        raise BcdError(f"the {card.backbone} network cannot be built here ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else err}).{hint}") from err
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_preprocessing()
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = build_classifier(card.backbone, **kwargs)
        model.load_state_dict(state, strict=True)
    return model


def _as_list(v: object) -> list:
    return list(v) if isinstance(v, list | tuple) else [v]


def load_model(path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu") -> Classifier:
    """Load the named checkpoint, or the default model (see :mod:`napari_bcd.config`).

    Raises
    ------
    ModelNotAvailableError
        When no path is given and no default model is configured.
    """
    from ..config import default_model_path
    from ..errors import ModelNotAvailableError

    if path is None:
        path = default_model_path()
        if path is None:
            raise ModelNotAvailableError(
                "No trained model is available. Either train one — `napari-bcd train DATASET --out "
                "model.safetensors` (from the BACH photos or your own annotated regions) — or use a checkpoint "
                "file: --model FILE.safetensors (or set NAPARI_BCD_MODEL)."
            )
    return load_checkpoint(path, device=device)
