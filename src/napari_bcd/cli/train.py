"""`napari-bcd export-patches`, `train`, `evaluate`, `data fetch` and `reproduce`: from regions or photos to a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._fileio import check_output, output_file
from .._progress import drive, progress_bar
from ..annotations.read import FORMAT_NAMES
from ..errors import BcdError
from ..model.backbones import PAPER_BACKBONE, backbone_spec, backbones_text
from ..settings import FEATURE_PRECISIONS, GROUP_KINDS, TRAIN_PROTOCOLS, VALIDATIONS, TrainSettings
from .options import (
    COUNT,
    COVERAGE,
    INPUT_PX,
    NON_NEGATIVE_INT,
    POSITIVE,
    VAL_SHARE,
    check_out_dir,
    check_out_file,
    label_pair,
    number,
)

#: A dataset's problems printed before training (all of them with --verbose, through the log).
SHOWN_PROBLEMS = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-patches", help="cut ICIAR-style patches from annotated regions of a slide")
    p.add_argument("slide")
    p.add_argument("annotations", help=FORMAT_NAMES)
    p.add_argument("--out", required=True, help="ICIAR folder to write (or add to)")
    p.add_argument("--model", help="take the field from this checkpoint (default: the ICIAR photo's 645 x 860 µm)")
    p.add_argument("--field-um", type=POSITIVE, nargs="+", metavar="UM", help="field h [w] in µm")
    p.add_argument("--stride", type=POSITIVE, default=1.0, help="window step as a fraction of the field")
    p.add_argument("--coverage", type=COVERAGE, default=0.5, help="fraction of a window that must lie in one class")
    p.add_argument("--min-per-class", type=NON_NEGATIVE_INT, default=20, help="warn about classes with fewer patches")
    p.add_argument("--label", action="append", type=label_pair, metavar="TEXT=CLASS",
                   help="map your label to a class, e.g. Tumor=Invasive")
    p.add_argument("--mpp", type=POSITIVE, help="µm per pixel of level 0, for files that do not say")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the patches' names that an earlier export did not write")
    p.set_defaults(func=_cmd_export_patches)

    p = sub.add_parser("train", help="train the Table II head on an ICIAR folder (your regions or the BACH photos)")
    p.add_argument("dataset", help="ICIAR folder (Normal/ Benign/ InSitu/ Invasive/), or the BACH download")
    p.add_argument("--out", required=True, help="checkpoint to write (NAME.safetensors + NAME.json)")
    p.add_argument("--protocol", choices=TRAIN_PROTOCOLS, default=TrainSettings.protocol,
                   help="auto (default): enough optimiser steps for a few regions, class-balanced, early stopping, "
                        "head started from the linear probe; paper: the paper's hyper-parameters exactly")
    p.add_argument("--backbone", default=PAPER_BACKBONE,
                   help=f"{backbones_text()} (default: the paper's)")
    p.add_argument("--backbone-weights", help="local backbone weights (safetensors or a plain state dict); "
                   "a safetensors file may state its preprocessing in its metadata; 'none' for random weights")
    p.add_argument("--preprocess", choices=["tf", "unit", "imagenet", "meanstd"],
                   help="pixel normalisation (default: what the weights file states, else the backbone's own)")
    p.add_argument("--mean", help="R,G,B for --preprocess meanstd")
    p.add_argument("--std", help="R,G,B for --preprocess meanstd")
    p.add_argument("--input-px", type=INPUT_PX, default=256, help="network input size in pixels (32-4096)")
    p.add_argument("--field-um", type=POSITIVE, nargs="+", metavar="UM",
                   help="field h [w] in µm (default: the one the patches record, else the ICIAR photo's)")
    p.add_argument("--epochs", type=COUNT, help="fixed number of epochs (default: the protocol's)")
    p.add_argument("--lr", type=POSITIVE, help="learning rate (default 1e-4, the paper's)")
    p.add_argument("--batch-size", type=COUNT, help="default 128, the paper's")
    p.add_argument("--val-fraction", type=VAL_SHARE,
                   help="share of each class kept to validate (default 0.2; 0: none)")
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.add_argument("--split", help="'bach-patient' (patient-aware split of the 400 BACH photos) or a file listing "
                   "the validation images")
    p.add_argument("--groups", metavar="CSV", help="file,group rows, or a manifest (CSV/TSV) whose header names a file "
                   "and a patient, case or slide column: the patient (or slide) of every image; no group is ever "
                   "split between training and validation")
    p.add_argument("--group-pattern", metavar="REGEX",
                   help=r"the group is the first capture group of the file name, e.g. '^(P\d+)_'")
    p.add_argument("--group-kind", choices=GROUP_KINDS,
                   help="what the groups are, for the reports (default: 'group')")
    p.add_argument("--no-groups", action="store_true",
                   help="ignore the groups found in the folder or its file names (validation is then by image, "
                        "and the simple classifier is what ships)")
    p.add_argument("--validation", choices=VALIDATIONS,
                   help="auto (default): cross-validation (over the groups when they are known, else over images); "
                        "cv; holdout (--val-fraction of the groups)")
    p.add_argument("--folds", type=number(int, 2, 50, low_open=False), default=TrainSettings.folds,
                   help="cross-validation folds (default 10 over patients, slides or regions, 5 over images; fewer "
                        "when there are fewer groups)")
    p.add_argument("--no-augment", action="store_true", help="no flips/rotations")
    p.add_argument("--feature-precision", choices=FEATURE_PRECISIONS, default=TrainSettings.feature_precision,
                   help="the number format of the backbone's features (auto: bf16 where the CPU or GPU runs it fast)")
    p.add_argument("--stain-augment", action="store_true",
                   help="also train on stain-jittered copies (HED: each stain x0.8-1.2), for slides stained unlike "
                        "the training images; recorded in the card")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of that name")
    p.add_argument("--no-default", action="store_true", help="never make it the default model")
    p.add_argument("--make-default", action="store_true",
                   help="make it the default even when it does not beat chance on its validation data")
    p.set_defaults(func=_cmd_train)

    _register_data(sub)


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Table III report of a checkpoint on an ICIAR folder")
    p.add_argument("checkpoint")
    p.add_argument("dataset")
    p.add_argument("--out", help="folder for report.json, report.txt and confusion_matrix.png")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true",
                   help="replace reports in --out that napari-bcd did not write (its own are replaced on a rerun)")
    p.set_defaults(func=_cmd_evaluate)



def _bach_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_zip", metavar="ZIP",
                   help="use ICIAR2018_BACH_Challenge.zip already on disk")
    p.add_argument("--accept-licence", action="store_true",
                   help="accept the BACH licence (CC BY-NC-ND 4.0) without asking (for scripts)")
    p.add_argument("--md5", help="md5 the archive must have (default: the one Zenodo publishes)")
    p.add_argument("--keep-zip", action="store_true", help="keep the downloaded archive after extracting")
    p.add_argument("--api", help="Zenodo records API address (default https://zenodo.org/api/records/)")



def _register_data(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="get public datasets").add_subparsers(dest="data_command", metavar="ACTION")
    p = d.add_parser("fetch", help="download, verify and extract a dataset (bach: the ICIAR 2018 photos)")
    p.add_argument("dataset", choices=["bach"])
    p.add_argument("--dir", help="where to put it (default: the per-user data folder, or $NAPARI_BCD_DATA_DIR)")
    _bach_options(p)
    p.set_defaults(func=_cmd_data_fetch)

    p = sub.add_parser("reproduce", help="the paper end to end: ImageNet weights + BACH + its protocol on two splits, "
                                         "with a report beside the paper's claims")
    p.add_argument("--data", help="BACH folder (default: the per-user data folder; fetched when absent)")
    p.add_argument("--out", default="bcd-reproduce", help="folder for the checkpoints and the report")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-default", action="store_true", help="do not make the best model the default")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that napari-bcd did not write (its own are replaced on a rerun)")
    _bach_options(p)
    p.set_defaults(func=_cmd_reproduce)



def _cmd_export_patches(args: argparse.Namespace) -> int:
    from ..annotations import read_annotations
    from ..io import open_slide
    from ..model.card import ICIAR_FIELD_UM
    from ..model.checkpoint import load_checkpoint
    from ..train.patches import iter_export_patches

    check_out_dir(Path(args.out))
    field = ICIAR_FIELD_UM
    if args.model:
        field = load_checkpoint(args.model).card.field_um
    if args.field_um:
        field = (args.field_um[0], args.field_um[-1])
    label_map = dict(item.split("=", 1) for item in args.label or [])
    anns = read_annotations(args.annotations, label_map=label_map)
    print(str(anns.report), file=sys.stderr)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        result = drive(
            iter_export_patches(slide, anns, args.out, field_um=field, stride=args.stride, coverage=args.coverage,
                                min_per_class=args.min_per_class, overwrite=args.overwrite),
            "patches", "patch",
        )
    print(result)
    if not sum(result.counts.values()):
        print("napari-bcd: no patch was written: no region gave a window of the field on tissue inside the slide. "
              "Check that the annotations belong to this slide (same scan, same pixel size), or use a smaller "
              "--field-um.", file=sys.stderr)
        return 1
    if result.too_few:
        print(f"napari-bcd: too few patches for {', '.join(result.too_few)}: annotate more of them, lower "
              "--coverage, or use --stride 0.5", file=sys.stderr)
    return 0

def _cmd_train(args: argparse.Namespace) -> int:
    from ..model.preprocessing import Preprocessing
    from ..train.finetune import iter_finetune
    from ..train.groups import group_dataset, without_groups
    from ..train.iciar import read_iciar

    check_out_file(args.out)
    notice = backbone_spec(args.backbone).notice()
    if notice:  # the licence and access, before any work
        print(f"napari-bcd: {notice}", file=sys.stderr)
    ds = read_iciar(args.dataset)
    if args.no_groups:
        if args.groups or args.group_pattern:
            raise BcdError("--no-groups ignores groups; it cannot be given with --groups or --group-pattern.")
        ds = without_groups(ds)
    ds = group_dataset(ds, groups_csv=args.groups, pattern=args.group_pattern, kind=args.group_kind)
    print(f"{len(ds)} images: " + ", ".join(f"{k} {v}" for k, v in ds.counts().items()), file=sys.stderr)
    if ds.groups is not None:
        print(f"{ds.n_groups} {ds.group_kind or 'group'}s (from {ds.group_source}): a {ds.group_kind or 'group'} is "
              "never split between training and validation", file=sys.stderr)
    else:
        print("no patient, slide or region is known for these images: validation will be by image, and optimistic "
              "(give --groups FILE.csv or --group-pattern REGEX)", file=sys.stderr)
    _say_problems(ds, "train")
    pre = Preprocessing.parse(args.preprocess, args.mean, args.std) if args.preprocess else None
    field = (args.field_um[0], args.field_um[-1]) if args.field_um else None
    settings = TrainSettings(
        protocol=args.protocol, backbone=args.backbone,
        backbone_weights=None if args.backbone_weights == "none" else (args.backbone_weights or "imagenet"),
        input_px=(args.input_px, args.input_px), field_um=field, preprocessing=pre, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed, split=args.split,
        augment=False if args.no_augment else None, device=args.device, overwrite=args.overwrite,
        stain_augment=args.stain_augment, validation=args.validation, folds=args.folds,
        feature_precision=args.feature_precision)
    result = drive(iter_finetune(ds, settings, out=args.out), "features", "img")
    return _report_training(result, make_default=args.make_default, no_default=args.no_default)

def _report_training(result, *, make_default: bool = False, no_default: bool = False) -> int:
    """Print what a training run gave (the verdict in words, the report) and decide whether it becomes the default."""
    from ..config import set_default_model
    from ..train.report import report_lines

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

def _accept_licence(args: argparse.Namespace) -> bool:
    """--accept-licence, or a yes at the terminal after the licence and citation are shown."""
    from ..train.bach import BACH_CITATION, BACH_LICENCE, BACH_SIZE_TEXT

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
    from ..train.bach import ZENODO_API, iter_fetch_bach

    accepted = True if args.from_zip else _accept_licence(args)
    result = drive(iter_fetch_bach(root, accept_licence=accepted, from_zip=args.from_zip,
                                    api=args.api or ZENODO_API, md5=args.md5, keep_zip=args.keep_zip),
                    "BACH", "B")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return result

def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from ..config import data_dir

    root = Path(args.dir) if args.dir else data_dir() / "BACH"
    result = _fetch_bach(args, root)
    print(f"BACH photos ready: {result.photos} (" + ", ".join(f"{k} {v}" for k, v in result.counts.items()) + ")")
    print(f"train on them: napari-bcd train {result.photos} --out MODEL [--split bach-patient], or napari-bcd "
          "reproduce")
    return 0

def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ..config import data_dir, set_default_model
    from ..model.imagenet import IMAGENET_MD5, IMAGENET_URL, cached_imagenet_weights, fetch_imagenet_weights
    from ..train.bach import bach_photos_dir
    from ..train.iciar import read_iciar
    from ..train.reproduce import iter_reproduce

    if cached_imagenet_weights() is None:
        print("ResNet152V2 ImageNet weights: not cached, downloading them", file=sys.stderr)
        bar = None

        def progress(done: int, total: int | None) -> None:
            nonlocal bar
            if bar is None:
                bar = progress_bar("weights", total, unit="B", unit_scale=True)
            bar.update(done - bar.n)

        try:
            fetch_imagenet_weights(IMAGENET_URL, expected_md5=IMAGENET_MD5, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    check_out_dir(Path(args.out))
    root = Path(args.data) if args.data else data_dir() / "BACH"
    photos = root if (root / "Benign").is_dir() else bach_photos_dir(root)
    note = ""
    if not (photos / "Benign").is_dir():
        result = _fetch_bach(args, root)
        photos = result.photos
        note = f"archive md5 {result.md5}" if result.md5 else ""
    ds = read_iciar(photos)
    out = Path(args.out)
    res = drive(iter_reproduce(ds, out, device=args.device, data_note=note or str(photos),
                                     overwrite=args.overwrite), "features", "img")
    print(res.report_md.read_text(encoding="utf-8"))
    print(f"wrote {res.report_md}, {res.report_json.name}, " + ", ".join(p.name for p in res.files))
    if res.best_checkpoint is not None and not args.no_default:
        set_default_model(res.best_checkpoint)
        print(f"{res.best_checkpoint} is now the default model")
    elif res.best_checkpoint is None:
        print("no run beat chance, so the default model is unchanged", file=sys.stderr)
    return 0


def _say_problems(ds, command: str) -> None:
    """Print what reading the dataset found wrong, once (the log has them only with --verbose)."""
    for msg in ds.problems[:SHOWN_PROBLEMS]:
        print(f"warning: {msg}", file=sys.stderr)
    if len(ds.problems) > SHOWN_PROBLEMS:
        print(f"warning: ... and {len(ds.problems) - SHOWN_PROBLEMS} more problems with {ds.root} "
              f"('napari-bcd --verbose {command} ...' lists them all)", file=sys.stderr)


def _evaluation_headline(checkpoint: str, ds, report) -> str:
    """The figure first, with its interval, beside what the model's training reported (and how it measured it)."""
    from ..model.card import read_card

    n = sum(report.support)
    counts = ", ".join(f"{k} {v}" for k, v in ds.counts().items())
    text = f"{Path(checkpoint).name} on {n} images of {ds.root} ({counts}): accuracy {report.accuracy:.1%}"
    if report.interval is not None:
        text += f", 95% interval {report.interval[0]:.1%}-{report.interval[1]:.1%} ({report.interval_method})"
    elif report.interval_method:
        text += f" (no interval: {report.interval_method})"
    text += "."
    try:
        card = read_card(checkpoint)
    except BcdError:
        return text
    m, split = card.metrics or {}, card.record.split or {}
    reported = m.get("accuracy")
    if isinstance(reported, int | float):
        how = split.get("kind") or m.get("validation") or "held-out images"
        text += (f" Its training reported {reported:.1%} ({how}"
                 + ("; optimistic: validation images shared patients with training" if m.get("optimistic") else "")
                 + f"): {100 * (report.accuracy - reported):+.1f} points here. On images of patients it never "
                 "trained on, this is what new patients get; on its own training images it says nothing.")
    return text


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..train.evaluate import evaluate
    from ..train.iciar import read_iciar

    replace = "any" if args.overwrite else "ours"
    names = ("report.json", "report.txt", "confusion_matrix.png")
    if args.out:
        check_out_dir(Path(args.out))
        for name in names:  # before the work: a report of the user's is never replaced unasked
            check_output(Path(args.out) / name, replace)
    ds = read_iciar(args.dataset)
    _say_problems(ds, "evaluate")
    report = evaluate(args.checkpoint, ds, device=args.device)
    print(_evaluation_headline(args.checkpoint, ds, report) + "\n")
    print(report.to_text())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with output_file(out / "report.json", "w", replace) as fh:
            fh.write(report.to_json())
        with output_file(out / "report.txt", "w", replace) as fh:
            fh.write(report.to_text() + "\n")
        report.save_confusion_png(out / "confusion_matrix.png", replace)
        print(f"wrote {out / 'report.json'}, report.txt, confusion_matrix.png")
    return 0
