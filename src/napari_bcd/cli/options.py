"""Option types and options shared by several commands, each defined once (choices from the core's constants)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..errors import BcdError

__all__ = ["COUNT", "COVERAGE", "INPUT_PX", "NON_NEGATIVE", "NON_NEGATIVE_INT", "POSITIVE", "SHARE", "VAL_SHARE",
           "add_classify_options", "add_decision_options", "add_qc_options", "check_out_dir", "check_out_file",
           "decision_from", "label_pair", "number", "qc_from", "settings_from"]


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = True,
            high_open: bool = False):
    """An argparse type: a finite number within bounds, or a message naming what is wrong."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low:g}, got {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'below' if high_open else 'at most'} {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE = number(float, 0)  # (0, inf)
SHARE = number(float, 0, 1, low_open=False)  # [0, 1]
COVERAGE = number(float, 0, 1)  # (0, 1]
VAL_SHARE = number(float, 0, 1, low_open=False, high_open=True)  # [0, 1)
COUNT = number(int, 1, low_open=False)  # 1, 2, ...
NON_NEGATIVE = number(float, 0, low_open=False)
NON_NEGATIVE_INT = number(int, 0, low_open=False)
INPUT_PX = number(int, 32, 4096, low_open=False)


def label_pair(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0].strip() or not text.split("=", 1)[1].strip():
        raise argparse.ArgumentTypeError(f"give YOUR_LABEL=CLASS, e.g. Tumor=Invasive; got {text!r}")
    return text


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written."""
    import tempfile

    if out.is_symlink() and not out.exists():
        raise BcdError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist. Create its "
                       "target or choose another folder.")

    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise BcdError(f"--out {out}: {parent} is a file, not a folder. Choose a folder for the outputs.")
            if parent != out and not os.access(parent, os.W_OK | os.X_OK):
                raise BcdError(f"--out {out} cannot be created: {parent} is not writable. Choose a folder you can "
                               "write to.")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise BcdError(f"--out {out} cannot be written ({err.strerror or err}). Choose a folder you can write "
                       "to.") from err


def check_out_file(path: str | Path | None, option: str = "--out") -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or in a folder that cannot be."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise BcdError(f"{option} {p} is a folder; give a file name (e.g. {p / 'model.safetensors'}).")
    check_out_dir(p.parent if str(p.parent) else Path("."))


def threshold(text: str) -> tuple[str, float]:
    """``CLASS=P`` for --threshold."""
    name, sep, value = text.partition("=")
    try:
        p = float(value)
    except ValueError:
        p = float("nan")
    if not sep or not name.strip() or not 0 < p <= 1:
        raise argparse.ArgumentTypeError(f"expected CLASS=P with P in (0, 1], e.g. Invasive=0.3; got {text!r}")
    return name.strip(), p


def decision_from(args: argparse.Namespace, card):
    """The card's decision rule with the command line's changes, or None when nothing was asked."""
    from ..decision import DecisionRule

    asked = (args.threshold or args.min_confidence is not None or args.min_quality is not None
             or args.uncertainty is not None or getattr(args, "clear", False))
    if not asked:
        return None
    rule = DecisionRule() if getattr(args, "clear", False) else DecisionRule.from_dict(card.decision)
    changes = {}
    if args.threshold:
        changes["thresholds"] = {**rule.thresholds, **dict(args.threshold)}
    if args.min_confidence is not None:
        changes["min_confidence"] = args.min_confidence
    if args.min_quality is not None:
        changes["min_quality"] = args.min_quality
    if args.uncertainty is not None:
        changes["measure"] = args.uncertainty
    rule = rule.replace(**changes)
    rule.check_classes(card.classes)
    return rule


def add_decision_options(p: argparse.ArgumentParser) -> None:
    from ..decision import DEFAULT_MEASURE, MEASURES

    p.add_argument("--threshold", action="append", type=threshold, metavar="CLASS=P",
                   help="call CLASS when its probability reaches P (most severe class first), e.g. Invasive=0.3; "
                        "repeat for several classes")
    p.add_argument("--min-confidence", type=SHARE, help="cells less confident than this are 'uncertain' (0-1)")
    p.add_argument("--uncertainty", choices=list(MEASURES),
                   help=f"the confidence measure of --min-confidence (default {DEFAULT_MEASURE})")
    p.add_argument("--min-quality", type=SHARE,
                   help="cells whose image quality (pen, blur, folds) is below this are 'uncertain' (0-1)")


def add_classify_options(p: argparse.ArgumentParser) -> None:
    """How a classification runs (:class:`~napari_bcd.settings.ClassifySettings`), for classify and demo."""
    from ..settings import (
        DECODE_MODES,
        MIN_TISSUE,
        PRECISIONS,
        STAIN_NORMALIZATIONS,
        TISSUE_THRESHOLD,
        ClassifySettings,
    )

    p.add_argument("--stride", type=POSITIVE, default=ClassifySettings.stride,
                   help="window step as a fraction of the field (0.5 = overlap)")
    p.add_argument("--stride-um", type=POSITIVE, help="window step in µm (overrides --stride)")
    p.add_argument("--refine", action="store_true",
                   help="adaptive overlap: windows one field apart first, then the overlapping windows of --stride "
                        "only where neighbouring cells disagree or the top two classes are close (e.g. --stride 0.25 "
                        "--refine: 75%% overlap where it matters, for a fraction of the windows)")
    p.add_argument("--batch-size", type=COUNT,
                   help="windows per model call (default: 128 on CUDA; on the CPU 4, 8 or 16, whichever runs fastest "
                        "on the run's first batches)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="number format: auto (bf16 on a GPU; on a CPU bf16 where it has bf16 units, else fp32, and "
                        "on runs of 150 windows or more int8 too: each checked against fp32 on the first batch, the "
                        "faster that agrees within a 0.15 probability change kept, fp32 if none does), fp32 (exact), "
                        "bf16, fp16, int8 (CPU, quantised on the first batch and checked the same way)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (GPU runs of many windows; compiled once per run, before the timing)")
    p.add_argument("--decode", default="auto", choices=list(DECODE_MODES),
                   help="where JPEG tiles are decoded: auto (nvJPEG on a CUDA GPU when a sample of the slide decodes "
                        "as on the CPU, else the CPU), cpu, or device (TorchCodec/torchvision on the model's device)")
    p.add_argument("--stain-normalize", choices=list(STAIN_NORMALIZATIONS), default="none",
                   help="normalise every window to the stain of the model's training images (Macenko or Vahadane)")
    p.add_argument("--tissue-threshold", type=SHARE, default=TISSUE_THRESHOLD,
                   help="minimum saturation of tissue (0-1)")
    p.add_argument("--min-tissue", type=SHARE, default=MIN_TISSUE,
                   help="classify windows with at least this tissue fraction")
    p.add_argument("--min-area", type=NON_NEGATIVE, default=0.0,
                   help="mm² a class must exceed to count for the slide call")
    p.add_argument("--mpp", type=POSITIVE, help="µm per pixel of level 0, for files that do not say")
    p.add_argument("--workers", type=COUNT, help="decoding threads (default: one per core, up to 8)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average every window over its 8 flips and rotations (8x the model's "
                        "work; their disagreement ranks the review queue)")
    add_qc_options(p)
    add_decision_options(p)


def add_qc_options(p: argparse.ArgumentParser) -> None:
    """Quality control before the classifier (:class:`~napari_bcd.qc.QCSettings`)."""
    from ..qc import QCSettings

    d = QCSettings()
    g = p.add_argument_group("quality control", "pen ink, folds, bubble edges/debris and blur found before the "
                             "classifier and left out of the map, the areas and the call (shown per reason)")
    g.add_argument("--no-qc", action="store_true", help="classify every tissue window (no quality control)")
    g.add_argument("--qc-action", choices=["skip", "set-aside"], default="skip",
                   help="what becomes of a failing window: skip (not classified, the default) or set-aside "
                        "(classified, its probabilities kept for a look, never in a label, an area or the call)")
    g.add_argument("--qc-pen", type=SHARE, default=d.pen, help=f"share of a window in pen ink (default {d.pen})")
    g.add_argument("--qc-fold", type=SHARE, default=d.fold,
                   help=f"share of a window's tissue dark as a fold (default {d.fold})")
    g.add_argument("--qc-debris", type=SHARE, default=d.debris,
                   help=f"share of a window in bubble edges or debris (default {d.debris})")
    g.add_argument("--qc-blur", type=SHARE, default=d.blur,
                   help=f"out of focus below this fraction of the slide's median sharpness (default {d.blur})")


def qc_from(args: argparse.Namespace):
    """The :class:`~napari_bcd.qc.QCSettings` of the command line."""
    from ..qc import QCSettings

    return QCSettings(enabled=not args.no_qc, action=args.qc_action.replace("-", "_"), pen=args.qc_pen,
                      fold=args.qc_fold, debris=args.qc_debris, blur=args.qc_blur)


def settings_from(args: argparse.Namespace, card=None):
    """The run's :class:`~napari_bcd.settings.ClassifySettings` from the command line (the card's rule, changed
    by the decision options when any is given)."""
    from ..settings import ClassifySettings

    decision = decision_from(args, card) if card is not None else None
    return ClassifySettings(stride=args.stride, stride_um=args.stride_um, tissue_threshold=args.tissue_threshold,
                            min_tissue=args.min_tissue, min_area=args.min_area, decision=decision,
                            batch_size=args.batch_size, device=args.device, precision=args.precision,
                            compile=args.compile, workers=args.workers, stain_normalize=args.stain_normalize,
                            decode=args.decode, refine=args.refine, qc=qc_from(args), tta=args.tta)
