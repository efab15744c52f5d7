"""`napari-bcd retrain`: learn a pathologist's corrections of a map, into a new model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._progress import drive
from .options import COUNT, POSITIVE, check_out_dir, check_out_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="learn corrected regions of a slide: a new model beside the old one")
    p.add_argument("checkpoint", help="the model whose map was corrected")
    p.add_argument("--corrections", required=True, metavar="FILE",
                   help="GeoJSON (QuPath, or the dock's export) of polygons classified with the right class")
    p.add_argument("--slide", required=True, help="the slide the corrections are on")
    p.add_argument("--out", help="the new checkpoint (default: <checkpoint>-rN.safetensors; never replaces a file)")
    p.add_argument("--weight", type=POSITIVE, default=4.0,
                   help="how many training images each corrected cell counts as")
    p.add_argument("--steps", type=COUNT, default=300, help="optimiser steps")
    p.add_argument("--data", help="the model's training images (default: where its card says; 'none' for none)")
    p.add_argument("--stride", type=POSITIVE, default=1.0, help="the classify run's --stride (cells must match)")
    p.add_argument("--mpp", type=POSITIVE, help="µm per pixel of level 0, for a slide that does not say")
    p.add_argument("--device", default="auto")
    p.add_argument("--classify-out", metavar="DIR", help="also classify the slide with the new model into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --classify-out")
    p.set_defaults(func=_cmd_retrain)


def _cmd_retrain(args: argparse.Namespace) -> int:
    from ..io import open_slide
    from ..model.card import read_card
    from ..review.corrections import read_corrections
    from ..review.retrain import iter_retrain
    from ..settings import ClassifySettings
    from ..tiling import grid_for

    check_out_file(args.out)
    if args.classify_out:
        check_out_dir(Path(args.classify_out))
    card = read_card(args.checkpoint)
    with open_slide(args.slide, mpp=args.mpp) as slide:
        grid = grid_for(slide, card, ClassifySettings(stride=args.stride))
        corrections = read_corrections(args.corrections, grid, card.classes, slide=slide.name)
        for note in corrections.notes:
            print(f"note: {note}", file=sys.stderr)
        data = None if args.data == "none" else ("card" if args.data is None else args.data)
        gen = iter_retrain(args.checkpoint, corrections, slide, out=args.out, weight=args.weight, steps=args.steps,
                           data=data, device=args.device, stride=args.stride, mpp=args.mpp,
                           whole_slide=args.classify_out is not None)
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
