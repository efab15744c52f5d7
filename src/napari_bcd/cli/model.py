"""`napari-bcd weights ...`, `model ...` and `selfcheck`: the ImageNet weights, checkpoints, one forward pass."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .._progress import progress_bar
from ..classes import BACH_CLASSES
from ..errors import BcdError
from .options import add_decision_options, decision_from


def register(sub: argparse._SubParsersAction) -> None:
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
    add_decision_options(p)
    p.add_argument("--clear", action="store_true", help="back to the most probable class, no cut-offs")
    p.set_defaults(func=_cmd_model_decision)
    p = m.add_parser("export", help="write a checkpoint as a WSInfer model folder (QuPath's WSInfer extension and the "
                                    "wsinfer command run it), checked to give the same probabilities")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["wsinfer"], default="wsinfer", help="the layout to write (default: wsinfer)")
    p.add_argument("--out", required=True, help="the model folder to write (config.json, torchscript_model.pt, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace files there that napari-bcd did not write")
    p.set_defaults(func=_cmd_model_export)

    c = sub.add_parser("cache", help="the feature cache: what training keeps between runs").add_subparsers(
        dest="cache_command", metavar="ACTION")
    p = c.add_parser("info", help="its size by backbone, and how often training found its features there")
    p.set_defaults(func=_cmd_cache_info)
    p = c.add_parser("clear", help="remove every cached feature (computed again when needed)")
    p.set_defaults(func=_cmd_cache_clear)



def register_qupath(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qupath-scripts", help="copy the QuPath scripts (classify a slide from QuPath; export its "
                                              "annotations for training) into a folder")
    p.add_argument("--out", default=".", help="folder to copy them into (default: here)")
    p.add_argument("--overwrite", action="store_true", help="replace scripts of the same name")
    p.set_defaults(func=_cmd_qupath_scripts)


def _cmd_qupath_scripts(args: argparse.Namespace) -> int:
    """The scripts ship inside the package: copy them where QuPath's script editor can open them."""
    import shutil
    from importlib.resources import files

    from .._fileio import check_output, output_file
    from .options import check_out_dir

    out = Path(args.out)
    check_out_dir(out)
    scripts = sorted(p for p in files("napari_bcd").joinpath("qupath").iterdir() if p.name.endswith(".groovy"))
    replace = "any" if args.overwrite else "never"
    for script in scripts:  # all checked before one is written; a link is replaced, never written through
        check_output(out / script.name, replace)
    for script in scripts:
        with script.open("rb") as src, output_file(out / script.name, "wb", replace) as dst:
            shutil.copyfileobj(src, dst)
        print(f"wrote {out / script.name}")
    print("In QuPath: Automate > Script editor > File > Open, then set NAPARI_BCD in the script to the full path "
          f"of this command ({shutil.which('napari-bcd') or 'which napari-bcd'}).")
    return 0


def register_selfcheck(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selfcheck", help="build the model and run it on a real H&E field")
    p.add_argument("--model", help="a checkpoint (default: the paper's network with an untrained head)")
    p.add_argument("--image", help="an RGB image to use instead of the bundled slide")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=_cmd_selfcheck)


def _cmd_weights_fetch(args: argparse.Namespace) -> int:
    from ..model.imagenet import IMAGENET_MD5, IMAGENET_URL, fetch_imagenet_weights

    bar = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar("download", total, unit="B", unit_scale=True)
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
    from ..model.imagenet import IMAGENET_MD5, import_keras_weights

    path = import_keras_weights(args.file, expected_md5=None if args.skip_md5 else IMAGENET_MD5)
    print(f"ImageNet weights ready: {path}")
    return 0


def _cmd_weights_info(args: argparse.Namespace) -> int:
    from ..config import cache_dir
    from ..model.imagenet import cached_imagenet_weights

    cached = cached_imagenet_weights()
    print(f"cache directory  {cache_dir()}")
    if cached:
        print(f"ResNet152V2 ImageNet weights  {cached}")
    else:
        print("ResNet152V2 ImageNet weights  not cached: run `napari-bcd weights fetch` or `napari-bcd weights import "
              "FILE.h5`")
    return 0 if cached else 1


def _cmd_model_info(args: argparse.Namespace) -> int:
    from ..model.card import read_card
    from ..model.checkpoint import load_checkpoint

    card = read_card(args.checkpoint)
    print(card.to_json() if args.json else card.describe())
    try:  # a card can read well above weights that cannot load: say so, and fail
        load_checkpoint(args.checkpoint)
    except BcdError as err:
        print(f"napari-bcd: this checkpoint does not load: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_model_decision(args: argparse.Namespace) -> int:
    from ..model.card import read_card
    from ..model.checkpoint import save_decision

    card = read_card(args.checkpoint)
    rule = decision_from(args, card)
    if rule is None:
        from ..decision import DecisionRule

        print(DecisionRule.from_dict(card.decision).describe())
        return 0
    save_decision(args.checkpoint, rule)
    print(f"{args.checkpoint}: {rule.describe()} (the weights are unchanged)")
    return 0


def _cmd_model_export(args: argparse.Namespace) -> int:
    from ..model.wsinfer_export import export_wsinfer

    res = export_wsinfer(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {res.folder}: {', '.join(p.name for p in res.files)}")
    print(f"{len(res.config['class_names'])} classes ({', '.join(res.config['class_names'])}); patches of "
          f"{res.config['patch_size_pixels']} px at {res.config['spacing_um_px']:.4g} µm/px; the exported model gives "
          f"these probabilities within {res.max_difference:.1g} on a real H&E patch")
    for caveat in res.not_applied:
        print(f"napari-bcd: QuPath and wsinfer will not apply {caveat}", file=sys.stderr)
    print("QuPath: copy the folder into the 'local' folder of the WSInfer extension's model directory (see README.md)")
    return 0


def _cmd_cache_info(args: argparse.Namespace) -> int:
    from ..train.cache import cache_info, feature_cache_dir, format_info

    folders, runs = cache_info()
    print(format_info(folders, runs, feature_cache_dir()))
    return 0


def _cmd_cache_clear(args: argparse.Namespace) -> int:
    from ..train.cache import clear_cache, feature_cache_dir

    freed = clear_cache()
    print(f"removed {feature_cache_dir()} ({freed / 2**20:.1f} MiB of features; computed again when needed)")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    """Build the paper's model and run it on a real H&E field of the bundled slide."""
    import warnings

    import numpy as np
    import torch

    from ..model import KERAS_PARAM_COUNT, TABLE2_TRAINABLE, Predictor, build_classifier, keras_param_count
    from ..model.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    if args.model:
        model = load_checkpoint(args.model)
        trained = True
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_classifier("resnet152v2", classes=BACH_CLASSES)
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

    from .._sample_data import SAMPLE_SLIDE

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
