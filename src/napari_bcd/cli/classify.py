"""`napari-bcd classify` (one slide, a folder, a manifest; here or on a Dask cluster) and `demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._progress import progress_bar
from ..settings import ClassifySettings
from .options import POSITIVE, add_classify_options, check_out_dir, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify whole slides and write labels, probabilities, summary, GeoJSON")
    p.add_argument("slides", nargs="*", metavar="SLIDE",
                   help="SVS, NDPI, OME-TIFF, TIFF, PNG or JPEG files, or folders of slides")
    p.add_argument("--recursive", action="store_true", help="also take the slides in sub-folders of a folder")
    p.add_argument("--manifest", metavar="CSV", help="a CSV of slides: path, and optionally mpp and id")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run the slides on a Dask cluster: tcp://HOST:PORT, or local:N for N worker processes here")
    p.add_argument("--model", help="checkpoint (default: the last trained/chosen model, or $NAPARI_BCD_MODEL)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_classify_options(p)
    p.set_defaults(func=_cmd_classify)


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="open the sample slide (or SLIDE) in napari, classified; --headless writes PNGs")
    p.add_argument("slide", nargs="?", help="a slide (default: the bundled CMU-1-Small-Region.svs)")
    p.add_argument("--model", help="checkpoint (default: the last trained/chosen model, or $NAPARI_BCD_MODEL)")
    p.add_argument("--headless", action="store_true", help="no window: write the outputs and a screenshot")
    p.add_argument("--out", default="napari-bcd-demo", help="output folder for --headless")
    p.add_argument("--device", default=ClassifySettings.device)
    p.add_argument("--stride", type=POSITIVE, default=ClassifySettings.stride,
                   help="window step as a fraction of the field")
    p.add_argument("--mpp", type=POSITIVE, help="µm per pixel of level 0, for a slide that does not say")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that the demo did not write (its own are replaced on a rerun)")
    p.set_defaults(func=_cmd_demo)


def _cmd_classify(args: argparse.Namespace) -> int:
    from .._fileio import check_output
    from ..cohort import SlideResult, collect_slides, connect, iter_cohort, table_paths, write_cohort_table
    from ..config import default_model_path
    from ..model.card import read_card
    from ..model.loaded import shared_cache

    out = Path(args.out)
    check_out_dir(out)
    items = collect_slides(args.slides, recursive=args.recursive, manifest=args.manifest, mpp=args.mpp)
    replace = "any" if args.overwrite else "ours"
    if len(items) > 1:  # before any slide: a cohort table of the user's is never replaced unasked
        for table in table_paths(out):
            check_output(table, replace)
    model_path = args.model or (str(default_model_path()) if default_model_path() else None)
    card = read_card(model_path) if model_path else None
    settings = settings_from(args, card)
    if card is not None:
        print(card.describe(), file=sys.stderr)
    if settings.decision is not None:
        print(f"decision  {settings.decision.describe()} (this run)", file=sys.stderr)
    client = None
    if args.cluster:
        client = connect(args.cluster)
        link = getattr(client, "dashboard_link", None)
        print(f"Dask cluster: {len(client.scheduler_info().get('workers', {}))} worker(s)"
              + (f"; dashboard {link}" if link else ""), file=sys.stderr)
    else:  # load once here: a bad model stops the run before any slide
        shared_cache().get(model_path, device=settings.device, precision=settings.precision,
                           compile=settings.compile)
    results: list[SlideResult] = []
    bar = None

    def progress(item: Any, p: Any) -> None:
        nonlocal bar
        if not getattr(p, "total", 0) or p.stage != "classify":
            return
        if bar is None or bar.desc != Path(item.path).name:
            if bar is not None:
                bar.close()
            bar = progress_bar(Path(item.path).name, p.total, unit="win")
        bar.update(p.done - bar.n)

    try:
        for result in iter_cohort(items, out, model_path, settings, overwrite=args.overwrite, client=client,
                                  on_progress=progress):
            if bar is not None:
                bar.close()
                bar = None
            results.append(result)
            _report_slide(result, out)
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and args.cluster.startswith("local:"):
                cluster.close()
        if results and len(items) > 1:
            order = {i.stem: k for k, i in enumerate(items)}
            results.sort(key=lambda r: order.get(r.item.stem, len(order)))
            tables = write_cohort_table(results, out, replace=replace)
            print("cohort table: " + ", ".join(str(t) for t in tables))
    failed = [Path(r.item.path).name for r in results if r.status == "failed"]
    if failed:
        print(f"napari-bcd: {len(failed)} of {len(items)} slide(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _report_slide(result, out: Path) -> None:
    """One slide's outcome on the terminal: its table, or why it was skipped or failed (from typed fields)."""
    name = Path(result.item.path).name
    if result.status == "failed":
        print(f"napari-bcd: {name}: {result.error}", file=sys.stderr)
        return
    if result.status == "skipped":
        print(f"{name}: skipped, {result.note or 'done'} (--overwrite to compute again)")
        return
    from ..model.tuning import describe_tuning

    run = result.run
    tta = ((result.summary.get("info") or {}).get("settings") or {}).get("tta")
    print(f"\n{name}: {run.windows} windows, {run.windows_per_s:.1f}/s, {run.precision} on {run.device}"
          + (", each the mean of its 8 flips and rotations (--tta)" if tta else "")
          + (f" ({result.note})" if result.note else ""))
    check = run.precision_check
    if check is not None:
        print(f"napari-bcd: {name}: {check.describe()}", file=sys.stderr if not check.passed else sys.stdout)
    for line in describe_tuning(run.batching, run.int8_trial):
        print(f"napari-bcd: {name}: {line}")
    print(result.table)
    warning = result.summary.get("stain_warning")
    if warning and run.stain.normalized == "none":
        print(f"napari-bcd: {name}: {warning}", file=sys.stderr)
    if result.summary.get("qc_warning"):
        print(f"napari-bcd: {name}: {result.summary['qc_warning']}", file=sys.stderr)
    if run.decode.fell_back:  # the device decoder was asked for, not used
        print(f"napari-bcd: {name}: tiles decoded on the CPU: {run.decode.detail}", file=sys.stderr)
    print(f"wrote {result.item.stem}.* in {out}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.slide, model=args.model, headless=args.headless, out=args.out, device=args.device,
                    stride=args.stride, mpp=args.mpp, overwrite=args.overwrite)
