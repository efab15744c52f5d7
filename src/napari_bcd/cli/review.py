"""`napari-bcd retrain`: learn a pathologist's corrections of a map, into a new model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._progress import drive
from ..review.retrain_settings import RetrainSettings
from .options import POSITIVE, check_out_dir, check_out_file, number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="learn corrected regions of a slide: a new model beside the old one")
    p.add_argument("checkpoint", help="the model whose map was corrected")
    p.add_argument("--corrections", required=True, metavar="FILE",
                   help="GeoJSON (QuPath, or the dock's export) of polygons classified with the right class")
    p.add_argument("--slide", required=True, help="the slide the corrections are on")
    p.add_argument("--out", help="the new checkpoint (default: <checkpoint>-rN.safetensors; never replaces a file)")
    p.add_argument("--weight", type=POSITIVE, default=RetrainSettings.weight,
                   help="how many training images each corrected cell counts as")
    p.add_argument("--steps", type=number(int, 1, RetrainSettings.MAX_STEPS, low_open=False),
                   default=RetrainSettings.steps, help=f"optimiser steps (at most {RetrainSettings.MAX_STEPS:,})")
    p.add_argument("--data", help="the model's training images (default: where its card says; 'none' for none)")
    p.add_argument("--map", metavar="SUMMARY", help="the corrected map's summary JSON (classify's "
                   "<slide>.summary.json): its run's settings (overlap, pixel size, tissue, stain, refine, precision) "
                   "cut the corrections and re-predict the slide")
    p.add_argument("--stride", type=POSITIVE, help="without --map: the classify run's --stride (cells must match)")
    p.add_argument("--mpp", type=POSITIVE, help="without --map: µm per pixel of level 0, for a slide that does not "
                   "say")
    p.add_argument("--device", default="auto")
    p.add_argument("--classify-out", metavar="DIR", help="also classify the slide with the new model into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --classify-out")
    p.set_defaults(func=_cmd_retrain)


def _cmd_retrain(args: argparse.Namespace) -> int:
    from ..io import open_slide
    from ..model.card import read_card
    from ..review.corrections import read_corrections
    from ..review.retrain import iter_retrain
    from ..tiling import grid_for

    check_out_file(args.out)
    if args.classify_out:
        check_out_dir(Path(args.classify_out))
    card = read_card(args.checkpoint)
    run = _map_run(args, card)
    with open_slide(args.slide, mpp=run.mpp) as slide:
        grid = grid_for(slide, card, run)
        corrections = read_corrections(args.corrections, grid, card.classes, slide=slide.name)
        for note in corrections.notes:
            print(f"note: {note}", file=sys.stderr)
        data = None if args.data == "none" else ("card" if args.data is None else args.data)
        gen = iter_retrain(args.checkpoint, corrections, slide, classify=run, out=args.out, weight=args.weight,
                           steps=args.steps, data=data, device=args.device, whole_slide=args.classify_out is not None)
        result = drive(gen, "retrain")
    if result is None:
        print("napari-bcd: stopped before training; nothing was saved", file=sys.stderr)
        return 130
    print(result.describe())
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.warning:
        print(f"napari-bcd: WARNING: {result.warning}", file=sys.stderr)
    if args.classify_out is not None and result.class_map is not None:
        from ..export import write_outputs

        out = Path(args.classify_out)
        check_out_dir(out)
        paths = write_outputs(result.class_map, out, overwrite=args.overwrite,
                              record={"model": str(result.checkpoint), "retrained_from": str(result.parent)})
        print("wrote " + ", ".join(p.name for p in paths.values()))
    return 0


def _map_run(args: argparse.Namespace, card):
    """The corrected map's run settings: from its summary (``--map``), where ``--stride`` / ``--mpp`` may only
    repeat them; without one, from those options (and the defaults), said on the terminal."""
    import json

    from ..errors import BcdError
    from ..settings import ClassifySettings

    given = {k: v for k, v in (("stride", args.stride), ("mpp", args.mpp)) if v is not None}
    if not args.map:
        print("note: no --map: the corrections are cut on a grid of "
              f"stride {given.get('stride', 1.0):g} with the default tissue settings; give the map's summary JSON "
              "(--map) to retrain on exactly the map's run", file=sys.stderr)
        return ClassifySettings(**given)
    path = Path(args.map)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        info = doc.get("info") or {}
        run = ClassifySettings.from_dict(info.get("settings"))
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise BcdError(f"--map {path} is not a summary JSON napari-bcd wrote ({err}). Give the "
                       "<slide>.summary.json of the classify run whose map was corrected.") from err
    if not isinstance(info.get("settings"), dict):
        raise BcdError(f"--map {path} does not record its run's settings (a summary from an older version): "
                       "classify the slide again, or leave --map out and give --stride/--mpp.")
    made_by = (info.get("model") or {}).get("weights_sha256")
    if made_by and card.weights_sha256 and made_by != card.weights_sha256:
        raise BcdError(f"--map {path} was made by another model ({(info.get('model') or {}).get('name')!r}, not "
                       f"{card.name!r}): retrain the model that made the map.")
    for key, value in given.items():
        mine = getattr(run, key)
        if mine is not None and not _same(mine, value):
            raise BcdError(f"--{key} {value:g} contradicts the map's run ({key} {mine}): retrain uses the map's "
                           f"settings; leave --{key} out.")
    return run.replace(**{k: v for k, v in given.items() if getattr(run, k) is None})


def _same(a, b) -> bool:
    pa = a if isinstance(a, tuple | list) else (a, a)
    pb = b if isinstance(b, tuple | list) else (b, b)
    return all(abs(float(x) - float(y)) <= 1e-9 * max(1.0, abs(float(x))) for x, y in zip(pa, pb, strict=True))
