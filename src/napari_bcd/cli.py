"""The ``napari-bcd`` command line.

argparse (standard library) rather than click/typer: no extra dependency, and
sub-commands import torch and friends only when they run, so ``--help`` is
instant.  Every :class:`~napari_bcd.errors.BcdError` becomes one plain
message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._progress import drive as _drive
from ._progress import progress_bar as _progress_bar
from ._version import __version__
from .errors import BcdError

if TYPE_CHECKING:
    from .cohort import CohortItem

log = logging.getLogger("napari_bcd")


# --------------------------------------------------------------------------- option types
def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = True,
            high_open: bool = False):
    """An argparse type: a finite number within bounds, or a message naming what is wrong."""
    import math

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


_POSITIVE = _number(float, 0)  # (0, inf)
_SHARE = _number(float, 0, 1, low_open=False)  # [0, 1]
_COVERAGE = _number(float, 0, 1)  # (0, 1]
_VAL_SHARE = _number(float, 0, 1, low_open=False, high_open=True)  # [0, 1)
_COUNT = _number(int, 1, low_open=False)  # 1, 2, ...
_NON_NEGATIVE = _number(float, 0, low_open=False)
_NON_NEGATIVE_INT = _number(int, 0, low_open=False)
_INPUT_PX = _number(int, 32, 4096, low_open=False)


def _label_pair(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0].strip() or not text.split("=", 1)[1].strip():
        raise argparse.ArgumentTypeError(f"give YOUR_LABEL=CLASS, e.g. Tumor=Invasive; got {text!r}")
    return text


# --------------------------------------------------------------------------- weights
def _cmd_weights_fetch(args: argparse.Namespace) -> int:
    from .model.imagenet import IMAGENET_MD5, IMAGENET_URL, fetch_imagenet_weights

    bar = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar("download", total, unit="B", unit_scale=True)
        bar.update(done - bar.n)

    try:
        path = fetch_imagenet_weights(args.url or IMAGENET_URL, expected_md5=None if args.skip_md5 else IMAGENET_MD5,
                                      progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"ImageNet weights ready: {path}")
    return 0


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from .model.imagenet import IMAGENET_MD5, import_keras_weights

    path = import_keras_weights(args.file, expected_md5=None if args.skip_md5 else IMAGENET_MD5)
    print(f"ImageNet weights ready: {path}")
    return 0


def _cmd_weights_info(args: argparse.Namespace) -> int:
    from .config import cache_dir
    from .model.imagenet import cached_imagenet_weights

    cached = cached_imagenet_weights()
    print(f"cache directory  {cache_dir()}")
    if cached:
        print(f"ResNet152V2 ImageNet weights  {cached}")
    else:
        print("ResNet152V2 ImageNet weights  not cached: run `napari-bcd weights fetch` or `napari-bcd weights import "
              "FILE.h5`")
    return 0 if cached else 1


# --------------------------------------------------------------------------- model
def _cmd_model_info(args: argparse.Namespace) -> int:
    from .model.card import read_card

    card = read_card(args.checkpoint)  # the card alone: no torch, no 232 MB of weights
    print(card.to_json() if args.json else card.describe())
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    """Build the paper's model and run it on a real H&E field of the bundled slide."""
    import warnings

    import numpy as np
    import torch

    from .model import KERAS_PARAM_COUNT, TABLE2_TRAINABLE, Predictor, build_classifier, keras_param_count
    from .model.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    if args.model:
        model = load_checkpoint(args.model)
        trained = True
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_classifier("resnet152v2")
        trained = False
        for w in caught:
            print(f"WARNING: {w.message}", file=sys.stderr)
    backbone_n = keras_param_count(model.backbone)
    head_n = sum(p.numel() for p in model.head.parameters())
    verdict = ""
    if model.card.backbone == "resnet152v2":
        verdict = " (Keras: 58,331,648 — " + ("match)" if backbone_n == KERAS_PARAM_COUNT else "MISMATCH)")
    print(f"backbone  {model.card.backbone}: {backbone_n:,} parameters as Keras counts them{verdict}")
    print(f"head      Table II: {head_n:,} trainable ({'matches' if head_n == TABLE2_TRAINABLE else 'differs from'} "
          f"the paper's {TABLE2_TRAINABLE:,}); total {backbone_n + head_n:,}")
    image = _sample_field(model.card, Path(args.image) if args.image else None)
    pred = Predictor(model, device=args.device)
    t1 = time.perf_counter()
    probs = pred(image[None])[0]
    t2 = time.perf_counter()
    print(f"input     {image.shape[0]}x{image.shape[1]} px, field {model.card.field_um[0]:.0f}x"
          f"{model.card.field_um[1]:.0f} µm, on {pred.device}")
    for name, p in zip(model.classes, probs, strict=True):
        print(f"  {name:<9} {p:6.3f}")
    print(f"forward   {1000 * (t2 - t1):.0f} ms (build {t1 - t0:.1f} s)")
    if not trained:
        print("NOTE: the head is untrained, so these probabilities mean nothing yet. Train one with "
              "`napari-bcd train` or pass a checkpoint with --model.")
    ok = bool(np.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-4)
    print("selfcheck " + ("passed" if ok else "FAILED"))
    del torch
    return 0 if ok else 1


def _sample_field(card, image: Path | None):
    """One model input from a real H&E image: the bundled slide's centre by default."""
    import numpy as np
    import tifffile
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ._sample_data import SAMPLE_SLIDE

    if image is None:
        with tifffile.TiffFile(SAMPLE_SLIDE) as tf:
            level0 = tf.series[0].levels[0].asarray()
        mpp = 0.499
        h = min(level0.shape[0], round(card.field_um[0] / mpp))
        w = min(level0.shape[1], round(card.field_um[1] / mpp))
        y0, x0 = (level0.shape[0] - h) // 2, (level0.shape[1] - w) // 2
        arr = level0[y0 : y0 + h, x0 : x0 + w]
    else:
        try:
            with Image.open(image) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise BcdError(f"--image {image} cannot be read as an image ({err}). Give a PNG, JPEG or TIFF.") from err
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=card.input_px, mode="area")
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


# --------------------------------------------------------------------------- classify
def _check_out_dir(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written."""
    import tempfile

    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise BcdError(f"--out {out}: {parent} is a file, not a folder. Choose a folder for the outputs.")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise BcdError(f"--out {out} cannot be written ({err.strerror or err}). Choose a folder you can write "
                       "to.") from err


def _threshold(text: str) -> tuple[str, float]:
    """``CLASS=P`` for --threshold."""
    name, sep, value = text.partition("=")
    try:
        p = float(value)
    except ValueError:
        p = float("nan")
    if not sep or not name.strip() or not 0 < p <= 1:
        raise argparse.ArgumentTypeError(f"expected CLASS=P with P in (0, 1], e.g. Invasive=0.3; got {text!r}")
    return name.strip(), p


def _decision_from(args: argparse.Namespace, card):
    """The card's decision rule with the command line's changes, or None when nothing was asked."""
    from .decision import DecisionRule

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


def _decision_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", action="append", type=_threshold, metavar="CLASS=P",
                   help="call CLASS when its probability reaches P (most severe class first), e.g. Invasive=0.3; "
                        "repeat for several classes")
    p.add_argument("--min-confidence", type=_SHARE, help="cells less confident than this are 'uncertain' (0-1)")
    p.add_argument("--uncertainty", choices=["max_probability", "margin", "entropy"],
                   help="the confidence measure of --min-confidence (default max_probability)")
    p.add_argument("--min-quality", type=_SHARE,
                   help="cells whose image quality (pen, blur, folds) is below this are 'uncertain' (0-1)")


def _cmd_model_decision(args: argparse.Namespace) -> int:
    from .model.checkpoint import load_checkpoint, save_checkpoint

    model = load_checkpoint(args.checkpoint)
    rule = _decision_from(args, model.card)
    if rule is None:
        from .decision import DecisionRule

        print(DecisionRule.from_dict(model.card.decision).describe())
        return 0
    save_checkpoint(model, model.card.replace(decision=rule.to_dict()), args.checkpoint, overwrite=True)
    print(f"{args.checkpoint}: {rule.describe()} (the weights are unchanged)")
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from .io.slide import open_slide
    from .model.card import read_card
    from .review.corrections import read_corrections
    from .review.retrain import iter_retrain
    from .tiling import make_grid

    card = read_card(args.checkpoint)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        if slide.mpp is None:
            raise BcdError(f"{slide.name} does not say its pixel size; pass --mpp.")
        grid = make_grid(slide.dimensions, slide.mpp, card.field_um, card.input_px,
                         [i.downsample for i in slide.level_info], stride=args.stride)
        corrections = read_corrections(args.corrections, grid, card.classes, slide=slide.name)
        for note in corrections.notes:
            print(f"note: {note}", file=sys.stderr)
        data = None if args.data == "none" else ("card" if args.data is None else args.data)
        gen = iter_retrain(args.checkpoint, corrections, slide, out=args.out, weight=args.weight, steps=args.steps,
                           data=data, device=args.device, stride=args.stride, mpp=args.mpp,
                           whole_slide=args.classify_out is not None)
        result = _drive(gen, "retrain")
    if result is None:
        print("napari-bcd: stopped before training; nothing was saved", file=sys.stderr)
        return 130
    print(result.describe())
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.classify_out is not None and result.class_map is not None:
        from .export import write_outputs

        out = Path(args.classify_out)
        _check_out_dir(out)
        paths = write_outputs(result.class_map, out, overwrite=args.overwrite,
                              record={"model": str(result.checkpoint), "retrained_from": str(result.parent)})
        print("wrote " + ", ".join(p.name for p in paths.values()))
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from .cohort import CohortSettings, collect_slides, connect, iter_cohort, write_cohort_table
    from .config import default_model_path
    from .model.card import read_card

    out = Path(args.out)
    _check_out_dir(out)
    items = collect_slides(args.slides, recursive=args.recursive, manifest=args.manifest, mpp=args.mpp)
    model_path = args.model or (str(default_model_path()) if default_model_path() else None)
    card = read_card(model_path) if model_path else None
    decision = _decision_from(args, card) if card is not None else None
    settings = CohortSettings(stride=args.stride, stride_um=args.stride_um, tissue_threshold=args.tissue_threshold,
                              min_tissue=args.min_tissue, min_area=args.min_area,
                              decision=decision.to_dict() if decision is not None else None,
                              batch_size=args.batch_size, device=args.device, precision=args.precision,
                              compile=args.compile, workers=args.workers, overwrite=args.overwrite,
                              stain_normalize=args.stain_normalize, decode=args.decode)
    if card is not None:
        print(card.describe(), file=sys.stderr)
    if decision is not None:
        print(f"decision  {decision.describe()} (this run)", file=sys.stderr)
    client = None
    if args.cluster:
        client = connect(args.cluster)
        link = getattr(client, "dashboard_link", None)
        print(f"Dask cluster: {len(client.scheduler_info().get('workers', {}))} worker(s)"
              + (f"; dashboard {link}" if link else ""), file=sys.stderr)
    else:
        from .cohort import cohort_model

        cohort_model(model_path, settings)  # load once here: a bad model stops the run before any slide
    rows: list[dict] = []
    bar = None

    def progress(item: CohortItem, p: Any) -> None:
        nonlocal bar
        from ._progress import progress_bar

        if not getattr(p, "total", 0) or p.stage != "classify":
            return
        if bar is None or bar.desc != Path(item.path).name:
            if bar is not None:
                bar.close()
            bar = progress_bar(Path(item.path).name, p.total, unit="win")
        bar.update(p.done - bar.n)

    try:
        for row in iter_cohort(items, out, model_path, settings, client=client, on_progress=progress):
            if bar is not None:
                bar.close()
                bar = None
            rows.append(row)
            name = Path(row["slide"]).name
            if row["status"] == "failed":
                print(f"napari-bcd: {name}: {row['error']}", file=sys.stderr)
            elif row["status"] == "skipped":
                print(f"{name}: skipped, {row.get('note', 'done')} (--overwrite to compute again)")
            else:
                print(f"\n{name}: {row.get('windows', 0)} windows, {row.get('windows_per_s', 0):.1f}/s"
                      + (f" ({row['note']})" if row.get("note") else ""))
                print(row.get("table", ""))
                if row.get("stain_warning") and "normalised" not in row["stain_warning"]:
                    print(f"napari-bcd: {name}: {row['stain_warning']}", file=sys.stderr)
                if str(row.get("decode", "")).startswith("cpu: "):  # the device decoder was asked for, not used
                    print(f"napari-bcd: {name}: tiles decoded on the CPU: {row['decode'][5:]}", file=sys.stderr)
                print(f"wrote {row['id']}.* in {out}")
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and args.cluster.startswith("local:"):
                cluster.close()
        if rows and len(items) > 1:
            order = {i.stem: k for k, i in enumerate(items)}
            rows.sort(key=lambda r: order.get(r["id"], len(order)))
            tables = write_cohort_table(rows, out)
            print("cohort table: " + ", ".join(str(t) for t in tables))
    failed = [Path(r["slide"]).name for r in rows if r["status"] == "failed"]
    if failed:
        print(f"napari-bcd: {len(failed)} of {len(items)} slide(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_export_patches(args: argparse.Namespace) -> int:
    from .annotations import read_annotations
    from .io.slide import open_slide
    from .model.card import ICIAR_FIELD_UM
    from .model.checkpoint import load_checkpoint
    from .train.iciar import iter_export_patches

    field = ICIAR_FIELD_UM
    if args.model:
        field = load_checkpoint(args.model).card.field_um
    if args.field_um:
        field = (args.field_um[0], args.field_um[-1])
    label_map = dict(item.split("=", 1) for item in args.label or [])
    anns = read_annotations(args.annotations, label_map=label_map)
    print(str(anns.report), file=sys.stderr)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        result = _drive(
            iter_export_patches(slide, anns, args.out, field_um=field, stride=args.stride, coverage=args.coverage,
                                min_per_class=args.min_per_class),
            "patches", "patch",
        )
    print(result)
    if result.too_few:
        print(f"napari-bcd: too few patches for {', '.join(result.too_few)}: annotate more of them, lower "
              "--coverage, or use --stride 0.5", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .model.preprocessing import Preprocessing
    from .train.finetune import iter_finetune
    from .train.groups import group_dataset
    from .train.iciar import read_iciar

    ds = group_dataset(read_iciar(args.dataset), groups_csv=args.groups, pattern=args.group_pattern,
                       kind=args.group_kind)
    print(f"{len(ds)} images: " + ", ".join(f"{k} {v}" for k, v in ds.counts().items()), file=sys.stderr)
    if ds.groups is not None:
        print(f"{ds.n_groups} {ds.group_kind or 'group'}s (from {ds.group_source}): a {ds.group_kind or 'group'} is "
              "never split between training and validation", file=sys.stderr)
    else:
        print("no patient, slide or region is known for these images: validation will be by image, and optimistic "
              "(give --groups FILE.csv or --group-pattern REGEX)", file=sys.stderr)
    for msg in ds.problems[:10]:
        print(f"warning: {msg}", file=sys.stderr)
    pre = Preprocessing.parse(args.preprocess, args.mean, args.std) if args.preprocess else None
    field = (args.field_um[0], args.field_um[-1]) if args.field_um else None
    result = _drive(
        iter_finetune(
            ds, out=args.out, protocol=args.protocol, backbone=args.backbone,
            backbone_weights=None if args.backbone_weights == "none" else (args.backbone_weights or "imagenet"),
            input_px=(args.input_px, args.input_px), field_um=field, preprocessing=pre, epochs=args.epochs,
            lr=args.lr, batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed,
            split=args.split, augment=False if args.no_augment else None,
            finetune_last_stage=args.finetune_last_stage, device=args.device, overwrite=args.overwrite,
            stain_augment=args.stain_augment, validation=args.validation, folds=args.folds,
        ),
        "features", "img",
    )
    return _report_training(result, make_default=args.make_default, no_default=args.no_default)


def _report_training(result, *, make_default: bool = False, no_default: bool = False) -> int:
    """Print what a training run gave (the verdict in words, the report) and decide whether it becomes the default."""
    from .config import set_default_model
    from .train.report import report_lines

    if result.checkpoint is None:
        print("napari-bcd: stopped before anything could be saved: no model was saved.", file=sys.stderr)
        return 1
    print(f"model     {result.checkpoint}")
    print("\n".join(report_lines(result)))
    print(result.verdict())
    if no_default:
        return 0
    if result.beats_chance or make_default:
        set_default_model(result.checkpoint)
        why = "" if result.beats_chance else " because --make-default asked for it"
        print(f"it is now the default model{why} (napari-bcd classify and the napari dock use it)")
    else:
        reason = ("it has no validation data to show it learned anything" if result.report is None
                  else f"its held-out accuracy {result.report.accuracy:.4f} does not beat chance "
                       f"({result.chance:.4f})")
        print(f"NOT made the default model: {reason}. Pass --make-default to use it anyway.")
    return 0


# --------------------------------------------------------------------------- data and the paper
def _accept_licence(args: argparse.Namespace) -> bool:
    """--accept-licence, or a yes at the terminal after the licence and citation are shown."""
    from .train.bach import BACH_CITATION, BACH_LICENCE, BACH_SIZE_TEXT

    if args.accept_licence:
        return True
    if not sys.stdin.isatty():
        return False
    print(f"The BACH (ICIAR 2018) photos: Zenodo record 3632035, {BACH_SIZE_TEXT}.\nLicence: {BACH_LICENCE} "
          f"(non-commercial use, no derivatives, attribution).\nCite: {BACH_CITATION}", file=sys.stderr)
    try:
        answer = input("Accept the licence and download? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _fetch_bach(args: argparse.Namespace, root: Path):
    from .train.bach import ZENODO_API, iter_fetch_bach

    accepted = True if args.from_zip else _accept_licence(args)
    result = _drive(iter_fetch_bach(root, accept_licence=accepted, from_zip=args.from_zip,
                                    api=args.api or ZENODO_API, md5=args.md5, keep_zip=args.keep_zip),
                    "BACH", "B")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return result


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from .config import data_dir

    root = Path(args.dir) if args.dir else data_dir() / "BACH"
    result = _fetch_bach(args, root)
    print(f"BACH photos ready: {result.photos} (" + ", ".join(f"{k} {v}" for k, v in result.counts.items()) + ")")
    print(f"train on them: napari-bcd train {result.photos} --out MODEL [--split bach-patient], or napari-bcd "
          "reproduce")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .config import data_dir, set_default_model
    from .model.imagenet import IMAGENET_MD5, IMAGENET_URL, cached_imagenet_weights, fetch_imagenet_weights
    from .train.bach import bach_photos_dir
    from .train.iciar import read_iciar
    from .train.reproduce import iter_reproduce

    if cached_imagenet_weights() is None:
        print("ResNet152V2 ImageNet weights: not cached, downloading them", file=sys.stderr)
        bar = None

        def progress(done: int, total: int | None) -> None:
            nonlocal bar
            if bar is None:
                bar = _progress_bar("weights", total, unit="B", unit_scale=True)
            bar.update(done - bar.n)

        try:
            fetch_imagenet_weights(IMAGENET_URL, expected_md5=IMAGENET_MD5, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    root = Path(args.data) if args.data else data_dir() / "BACH"
    photos = root if (root / "Benign").is_dir() else bach_photos_dir(root)
    note = ""
    if not (photos / "Benign").is_dir():
        result = _fetch_bach(args, root)
        photos = result.photos
        note = f"archive md5 {result.md5}" if result.md5 else ""
    ds = read_iciar(photos)
    out = Path(args.out)
    res = _drive(iter_reproduce(ds, out, device=args.device, data_note=note or str(photos)), "features", "img")
    print(res.report_md.read_text(encoding="utf-8"))
    print(f"wrote {res.report_md}, {res.report_json.name}, " + ", ".join(p.name for p in res.files))
    if res.best_checkpoint is not None and not args.no_default:
        set_default_model(res.best_checkpoint)
        print(f"{res.best_checkpoint} is now the default model")
    elif res.best_checkpoint is None:
        print("no run beat chance, so the default model is unchanged", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .train.evaluate import evaluate
    from .train.iciar import read_iciar

    ds = read_iciar(args.dataset)
    report = evaluate(args.checkpoint, ds, device=args.device)
    print(report.to_text())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        from ._fileio import atomic_write

        with atomic_write(out / "report.json", "w") as fh:
            fh.write(report.to_json())
        with atomic_write(out / "report.txt", "w") as fh:
            fh.write(report.to_text() + "\n")
        report.save_confusion_png(out / "confusion_matrix.png")
        print(f"wrote {out / 'report.json'}, report.txt, confusion_matrix.png")
    return 0


# --------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.slide, model=args.model, headless=args.headless, out=args.out, device=args.device,
                    stride=args.stride, mpp=args.mpp)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .io.device_decode import DECODE_MODES

    parser = argparse.ArgumentParser(
        prog="napari-bcd",
        description="Breast cancer classification of H&E slides (ICIAR 2018 / BACH classes).",
    )
    parser.add_argument("--version", action="version", version=f"napari-bcd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("weights", help="get the ResNet152V2 ImageNet weights").add_subparsers(
        dest="weights_command", metavar="ACTION"
    )
    p = w.add_parser("fetch", help="download the official Keras file, check its md5, convert and cache it")
    p.add_argument("--url", help="download address (default: the official Keras one)")
    p.add_argument("--skip-md5", action="store_true", help="accept a file whose md5 is not the official one")
    p.set_defaults(func=_cmd_weights_fetch)
    p = w.add_parser("import", help="convert and cache a local copy of the Keras file (behind a firewall)")
    p.add_argument("file", help="resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5")
    p.add_argument("--skip-md5", action="store_true",
                   help="accept a Keras ResNet152V2 file that is not the official one")
    p.set_defaults(func=_cmd_weights_import)
    p = w.add_parser("info", help="where the weights are cached")
    p.set_defaults(func=_cmd_weights_info)

    m = sub.add_parser("model", help="inspect checkpoints").add_subparsers(dest="model_command", metavar="ACTION")
    p = m.add_parser("info", help="print a checkpoint's model card")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="the whole card as JSON")
    p.set_defaults(func=_cmd_model_info)
    p = m.add_parser("decision", help="show or set a checkpoint's per-class thresholds and uncertainty cut-offs "
                                      "(stored in its card; the weights are unchanged)")
    p.add_argument("checkpoint")
    _decision_options(p)
    p.add_argument("--clear", action="store_true", help="back to the most probable class, no cut-offs")
    p.set_defaults(func=_cmd_model_decision)

    p = sub.add_parser("classify", help="classify whole slides and write labels, probabilities, summary, GeoJSON")
    p.add_argument("slides", nargs="*", metavar="SLIDE",
                   help="SVS, NDPI, OME-TIFF, TIFF, PNG or JPEG files, or folders of slides")
    p.add_argument("--recursive", action="store_true", help="also take the slides in sub-folders of a folder")
    p.add_argument("--manifest", metavar="CSV", help="a CSV of slides: path, and optionally mpp and id")
    p.add_argument("--stain-normalize", choices=["none", "macenko", "vahadane"], default="none",
                   help="normalise every window to the stain of the model's training images (Macenko or Vahadane)")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run the slides on a Dask cluster: tcp://HOST:PORT, or local:N for N worker processes here")
    p.add_argument("--model", help="checkpoint (default: the last trained/chosen model, or $NAPARI_BCD_MODEL)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stride", type=_POSITIVE, default=1.0,
                   help="window step as a fraction of the field (0.5 = overlap)")
    p.add_argument("--stride-um", type=_POSITIVE, help="window step in µm (overrides --stride)")
    p.add_argument("--batch-size", type=_COUNT, help="windows per model call (default: 128 on CUDA, 4 on the CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (GPU runs of many windows; compiled once per run, before the timing)")
    p.add_argument("--decode", default="auto", choices=list(DECODE_MODES),
                   help="where JPEG tiles are decoded: auto (nvJPEG on a CUDA GPU when a sample of the slide decodes "
                        "as on the CPU, else the CPU), cpu, or device (TorchCodec/torchvision on the model's device)")
    p.add_argument("--tissue-threshold", type=_SHARE, default=0.1, help="minimum saturation of tissue (0-1)")
    p.add_argument("--min-tissue", type=_SHARE, default=0.25,
                   help="classify windows with at least this tissue fraction")
    p.add_argument("--min-area", type=_NON_NEGATIVE, default=0.0,
                   help="mm² a class must exceed to count for the slide call")
    p.add_argument("--mpp", type=_POSITIVE, help="µm per pixel of level 0, for files that do not say")
    p.add_argument("--workers", type=_COUNT, help="decoding threads (default: one per core, up to 8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _decision_options(p)
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("export-patches", help="cut ICIAR-style patches from annotated regions of a slide")
    p.add_argument("slide")
    p.add_argument("annotations", help="QuPath GeoJSON, ImageScope XML or ASAP XML")
    p.add_argument("--out", required=True, help="ICIAR folder to write (or add to)")
    p.add_argument("--model", help="take the field from this checkpoint (default: the ICIAR photo's 645 x 860 µm)")
    p.add_argument("--field-um", type=_POSITIVE, nargs="+", metavar="UM", help="field h [w] in µm")
    p.add_argument("--stride", type=_POSITIVE, default=1.0, help="window step as a fraction of the field")
    p.add_argument("--coverage", type=_COVERAGE, default=0.5, help="fraction of a window that must lie in one class")
    p.add_argument("--min-per-class", type=_NON_NEGATIVE_INT, default=20, help="warn about classes with fewer patches")
    p.add_argument("--label", action="append", type=_label_pair, metavar="TEXT=CLASS",
                   help="map your label to a class, e.g. Tumor=Invasive")
    p.add_argument("--mpp", type=_POSITIVE, help="µm per pixel of level 0, for files that do not say")
    p.set_defaults(func=_cmd_export_patches)

    p = sub.add_parser("train", help="train the Table II head on an ICIAR folder (your regions or the BACH photos)")
    p.add_argument("dataset", help="ICIAR folder (Normal/ Benign/ InSitu/ Invasive/), or the BACH download")
    p.add_argument("--out", required=True, help="checkpoint to write (NAME.safetensors + NAME.json)")
    p.add_argument("--protocol", choices=["auto", "paper"], default="auto",
                   help="auto (default): enough optimiser steps for a few regions, class-balanced, early stopping, "
                        "head started from the linear probe; paper: the paper's hyper-parameters exactly")
    p.add_argument("--backbone", default="resnet152v2", help="resnet152v2 (the paper) or timm:<name>")
    p.add_argument("--backbone-weights", help="local backbone weights (safetensors or a plain state dict); "
                   "a safetensors file may state its preprocessing in its metadata; 'none' for random weights")
    p.add_argument("--preprocess", choices=["tf", "unit", "imagenet", "meanstd"],
                   help="pixel normalisation (default: what the weights file states, else the backbone's own)")
    p.add_argument("--mean", help="R,G,B for --preprocess meanstd")
    p.add_argument("--std", help="R,G,B for --preprocess meanstd")
    p.add_argument("--input-px", type=_INPUT_PX, default=256, help="network input size in pixels (32-4096)")
    p.add_argument("--field-um", type=_POSITIVE, nargs="+", metavar="UM",
                   help="field h [w] in µm (default: the one the patches record, else the ICIAR photo's)")
    p.add_argument("--epochs", type=_COUNT, help="fixed number of epochs (default: the protocol's)")
    p.add_argument("--lr", type=_POSITIVE, help="learning rate (default 1e-4, the paper's)")
    p.add_argument("--batch-size", type=_COUNT, help="default 128, the paper's")
    p.add_argument("--val-fraction", type=_VAL_SHARE,
                   help="share of each class kept to validate (default 0.2; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", help="'bach-patient' (patient-aware split of the 400 BACH photos) or a file listing "
                   "the validation images")
    p.add_argument("--groups", metavar="CSV", help="file,group rows: the patient (or slide) of every image; no group "
                   "is ever split between training and validation")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help=r"the group is the first capture group of the file name, e.g. '^(P\d+)_'")
    p.add_argument("--group-kind", choices=["patient", "slide", "region"],
                   help="what the groups are, for the reports (default: 'group')")
    p.add_argument("--validation", choices=["auto", "cv", "holdout"],
                   help="auto (default): cross-validation over the groups when they are known, else a hold-out; "
                        "cv; holdout (--val-fraction of the groups)")
    p.add_argument("--folds", type=_number(int, 2, 50, low_open=False), default=5,
                   help="cross-validation folds (default 5; fewer when there are fewer groups)")
    p.add_argument("--no-augment", action="store_true", help="no flips/rotations")
    p.add_argument("--finetune-last-stage", action="store_true", help="also train the backbone's last stage")
    p.add_argument("--stain-augment", action="store_true",
                   help="also train on stain-jittered copies (HED: each stain x0.8-1.2), for slides stained unlike "
                        "the training images; recorded in the card")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of that name")
    p.add_argument("--no-default", action="store_true", help="never make it the default model")
    p.add_argument("--make-default", action="store_true",
                   help="make it the default even when it does not beat chance on its validation data")
    p.set_defaults(func=_cmd_train)

    def bach_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--from", dest="from_zip", metavar="ZIP",
                       help="use ICIAR2018_BACH_Challenge.zip already on disk")
        p.add_argument("--accept-licence", action="store_true",
                       help="accept the BACH licence (CC BY-NC-ND 4.0) without asking (for scripts)")
        p.add_argument("--md5", help="md5 the archive must have (default: the one Zenodo publishes)")
        p.add_argument("--keep-zip", action="store_true", help="keep the downloaded archive after extracting")
        p.add_argument("--api", help="Zenodo records API address (default https://zenodo.org/api/records/)")

    d = sub.add_parser("data", help="get public datasets").add_subparsers(dest="data_command", metavar="ACTION")
    p = d.add_parser("fetch", help="download, verify and extract a dataset (bach: the ICIAR 2018 photos)")
    p.add_argument("dataset", choices=["bach"])
    p.add_argument("--dir", help="where to put it (default: the per-user data folder, or $NAPARI_BCD_DATA_DIR)")
    bach_options(p)
    p.set_defaults(func=_cmd_data_fetch)

    p = sub.add_parser("reproduce", help="the paper end to end: ImageNet weights + BACH + its protocol on two splits, "
                                         "with a report beside the paper's claims")
    p.add_argument("--data", help="BACH folder (default: the per-user data folder; fetched when absent)")
    p.add_argument("--out", default="bcd-reproduce", help="folder for the checkpoints and the report")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-default", action="store_true", help="do not make the best model the default")
    bach_options(p)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("retrain", help="learn corrected regions of a slide: a new model beside the old one")
    p.add_argument("checkpoint", help="the model whose map was corrected")
    p.add_argument("--corrections", required=True, metavar="FILE",
                   help="GeoJSON (QuPath, or the dock's export) of polygons classified with the right class")
    p.add_argument("--slide", required=True, help="the slide the corrections are on")
    p.add_argument("--out", help="the new checkpoint (default: <checkpoint>-rN.safetensors; never replaces a file)")
    p.add_argument("--weight", type=_POSITIVE, default=4.0,
                   help="how many training images each corrected cell counts as")
    p.add_argument("--steps", type=_COUNT, default=300, help="optimiser steps")
    p.add_argument("--data", help="the model's training images (default: where its card says; 'none' for none)")
    p.add_argument("--stride", type=_POSITIVE, default=1.0, help="the classify run's --stride (cells must match)")
    p.add_argument("--mpp", type=_POSITIVE, help="µm per pixel of level 0, for a slide that does not say")
    p.add_argument("--device", default="auto")
    p.add_argument("--classify-out", metavar="DIR", help="also classify the slide with the new model into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --classify-out")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("evaluate", help="Table III report of a checkpoint on an ICIAR folder")
    p.add_argument("checkpoint")
    p.add_argument("dataset")
    p.add_argument("--out", help="folder for report.json, report.txt and confusion_matrix.png")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="open the sample slide (or SLIDE) in napari, classified; --headless writes PNGs")
    p.add_argument("slide", nargs="?", help="a slide (default: the bundled CMU-1-Small-Region.svs)")
    p.add_argument("--model", help="checkpoint (default: the last trained/chosen model, or $NAPARI_BCD_MODEL)")
    p.add_argument("--headless", action="store_true", help="no window: write the outputs and a screenshot")
    p.add_argument("--out", default="napari-bcd-demo", help="output folder for --headless")
    p.add_argument("--device", default="auto")
    p.add_argument("--stride", type=_POSITIVE, default=1.0, help="window step as a fraction of the field")
    p.add_argument("--mpp", type=_POSITIVE, help="µm per pixel of level 0, for a slide that does not say")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("selfcheck", help="build the model and run it on a real H&E field")
    p.add_argument("--model", help="a checkpoint (default: the paper's network with an untrained head)")
    p.add_argument("--image", help="an RGB image to use instead of the bundled slide")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=_cmd_selfcheck)
    return parser


def _terminate_as_interrupt() -> None:
    """SIGTERM (a scheduler, `kill`) and SIGINT end a run like Ctrl-C: clean-up code runs, no temporary file is left.

    SIGINT gets Python's handler even when the parent ignored it (a shell starts background jobs so): a
    ``kill -INT`` then still stops the run cleanly instead of being lost.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-bcd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 1
    _terminate_as_interrupt()
    try:
        return int(func(args) or 0)
    except BcdError as err:
        print(f"napari-bcd: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-bcd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
