"""Cohorts: many slides, one table, resumable, on this machine or a Dask cluster.

:func:`collect_slides` turns command-line paths, folders (``recursive``) and
CSV manifests (``path``, optional ``mpp`` and ``id``) into
:class:`CohortItem` s.  :func:`classify_one` classifies one slide into the
output folder under its lock: a slide whose outputs are complete (a valid
done-record, written last) from the same model and settings is skipped; one
left half-written by an interrupted run is computed again; complete outputs
of another model or other settings are replaced only with ``overwrite``.
:func:`iter_cohort` runs them all in this process, or as one task per slide
on a Dask ``distributed`` cluster (each worker process loads the model once
and keeps it; a task lost with its worker is run again elsewhere; finished
slides are never lost, being on disk with their done-records), yielding one
:class:`SlideResult` per slide as it finishes; :func:`write_cohort_table`
writes the cohort table (CSV, and Parquet when pyarrow is installed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fileio import printable
from .errors import BcdError, os_error_text
from .geometry import pixel_size
from .io.formats import SLIDE_SUFFIXES, slides_in
from .settings import ClassifySettings

if TYPE_CHECKING:
    from .engine import RunRecord

__all__ = ["CohortItem", "SlideResult", "classify_one", "collect_slides", "iter_cohort", "table_paths",
           "write_cohort_table"]

log = logging.getLogger(__name__)

TABLE_NAME = "cohort"


@dataclass(frozen=True)
class CohortItem:
    """One slide of a cohort: its path, an optional pixel size, and the id its outputs are named by."""

    path: str
    mpp: float | None = None
    id: str = ""

    @property
    def stem(self) -> str:
        return self.id or Path(self.path).stem


def read_manifest(path: str | os.PathLike[str]) -> list[CohortItem]:
    """A CSV with a ``path`` column (relative paths are from the manifest's folder), optional ``mpp`` and ``id``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BcdError(f"The manifest {p} cannot be read ({err}).") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [str(k).strip().lower() for k in (reader.fieldnames or [])]
    if "path" not in header:
        hint = (" It looks separated by semicolons or tabs: use commas." if header and any(
            sep in header[0] for sep in (";", "\t")) else "")
        raise BcdError(f"The manifest {p} needs a header with a 'path' column (and optionally 'mpp' and 'id')."
                       + hint)
    rows = list(reader)
    if not rows:
        raise BcdError(f"The manifest {p} lists no slides under its header.")
    items = []
    for n, row in enumerate(rows, start=2):
        if None in row:  # csv puts a row's extra fields under the key None
            raise BcdError(f"{p}, line {n}: more fields than the header has ({len(header)}); quote paths that "
                           "contain commas.")
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("path"):
            raise BcdError(f"{p}, line {n}: no path.")
        ident = row.get("id", "")
        if ident and (ident in (".", "..") or any(c in ident for c in "/\\\0") or ident.startswith(".")
                      or len(ident.encode()) > 200):
            raise BcdError(f"{p}, line {n}: the id {ident!r} cannot name output files (ids become file names: no "
                           "'/', '\\', leading '.', or more than 200 bytes).")
        slide = Path(row["path"])
        if not slide.is_absolute():
            slide = p.parent / slide
        mpp = None
        if row.get("mpp"):
            try:
                value: object = float(row["mpp"])
            except ValueError:
                value = row["mpp"]
            mpp = pixel_size(value, f"{p}, line {n}: mpp")[0]
        items.append(CohortItem(str(slide), mpp, ident))
    return items


def collect_slides(inputs: list[str], *, recursive: bool = False, manifest: str | None = None,
                   mpp: float | None = None) -> list[CohortItem]:
    """The cohort's slides from paths, folders and a manifest; refuses two slides with one output name.

    ``mpp`` applies to slides the manifest gives none for.
    """
    items: list[CohortItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = slides_in(p, recursive)
            if not found:
                raise BcdError(f"{p} holds no slide ({', '.join(SLIDE_SUFFIXES)})"
                               + ("" if recursive else "; pass --recursive to look in its sub-folders") + ".")
            items.extend(CohortItem(str(f), mpp) for f in found)
        else:
            items.append(CohortItem(str(p), mpp))
    if manifest:
        items.extend(CohortItem(i.path, i.mpp if i.mpp is not None else mpp, i.id) for i in read_manifest(manifest))
    if not items:
        raise BcdError("No slides given: name slides or folders, or pass --manifest FILE.csv.")
    stems = Counter(i.stem for i in items)
    twice = sorted(s for s, n in stems.items() if n > 1)
    if twice:
        same = [i.path for i in items if i.stem == twice[0]]
        raise BcdError(f"{', '.join(same)} would write the same outputs ({twice[0]}.*). Rename one, give them "
                       "distinct ids in a manifest, or classify them into different --out folders.")
    return items


# ---------------------------------------------------------------- one slide


@dataclass
class SlideResult:
    """What became of one slide: done, skipped (its outputs stand) or failed (``error`` says why).

    ``summary`` is the slide's summary as data; ``run`` the typed record of the
    pass (None when skipped or failed); ``table`` the summary for a terminal.
    """

    item: CohortItem
    status: str
    error: str = ""
    seconds: float = 0.0
    model: str = ""
    model_sha256: str = ""
    summary: dict = field(default_factory=dict)
    run: RunRecord | None = None
    note: str = ""
    table: str = ""

    def row(self) -> dict:
        """The slide's row of the cohort table."""
        out: dict[str, Any] = {"id": printable(self.item.stem), "slide": printable(str(self.item.path)),
                               "status": self.status,
                               "error": self.error, "seconds": round(self.seconds, 3)}
        if self.model:
            out.update(model=self.model, model_sha256=self.model_sha256)
        if self.run is not None:
            out.update(windows_per_s=self.run.windows_per_s, decode=self.run.decode.text,
                       precision=self.run.precision)
        if self.summary:
            out.update(_summary_row(self.summary))
        if self.note:
            out["note"] = self.note
        return out


def _summary_row(summary: dict) -> dict:
    out = {"windows": summary.get("windows", 0), "tissue_mm2": summary.get("tissue_area_mm2"),
           "classified_mm2": summary.get("classified_area_mm2"),
           "uncertain_mm2": summary.get("uncertain_area_mm2", 0.0),
           "call": summary.get("call") or "", "call_probability": summary.get("call_probability"),
           "decision": summary.get("decision", ""), "stain_warning": summary.get("stain_warning", ""),
           "qc_left_out_mm2": summary.get("left_out_mm2", 0.0), "qc_warning": summary.get("qc_warning", "")}
    for reason, mm2 in (summary.get("left_out") or {}).items():
        out[f"qc_{reason}_mm2"] = mm2
    for c in summary.get("classes", []):
        out[f"{c['name']}_mm2"] = c["area_mm2"]
        out[f"{c['name']}_percent"] = c["percent_of_tissue"]
    return out


def classify_one(item: CohortItem, out: str | os.PathLike[str], model_path: str | None,
                 settings: ClassifySettings, *, overwrite: bool = False,
                 on_progress: Callable[[Any], None] | None = None) -> SlideResult:
    """Classify one slide into ``out`` (or skip it when its outputs stand).

    Errors a user can act on (a bad file, outputs of another model...) come
    back as a ``failed`` result with the message; nothing is raised for them.
    """
    from .done import (
        outputs_complete,
        run_changes,
        run_keys,
        same_source,
        slide_lock,
        source_identity,
        written_by_us,
    )
    from .engine import iter_classify
    from .export import output_paths, write_outputs
    from .io import open_slide
    from .model.loaded import shared_cache
    from .summary import summarize

    t0 = time.perf_counter()
    out = Path(out)
    try:
        loaded = shared_cache().get(model_path, device=_worker_device(settings.device),
                                    precision=settings.precision, compile=settings.compile)
        keys = run_keys(settings, loaded.card, item.mpp)
        with slide_lock(out, item.stem):
            paths = output_paths(out, item.stem)
            done = outputs_complete(out, item.stem)
            source = source_identity(item.path)
            if done is not None and not overwrite:
                if not same_source(done, source):
                    raise BcdError(f"{out} holds {item.stem}'s outputs from another slide, or from this file before "
                                   f"it changed ({done['source'].get('path')}); pass --overwrite to replace them, or "
                                   "write this slide to another --out folder")
                changed = run_changes(done, keys, loaded.sha)
                if not changed:
                    summary = json.loads(paths["summary_json"].read_text(encoding="utf-8"))
                    return SlideResult(item, "skipped", model=loaded.card.name, model_sha256=loaded.sha,
                                       summary=summary, note="outputs complete from this model and settings")
                raise BcdError(f"outputs already exist in {out} ({paths['labels'].name}…) from another run ("
                               f"{'; '.join(changed)}); pass --overwrite to replace them")
            redo = done is None and any(p.exists() for p in paths.values())
            if redo and not overwrite and not written_by_us(out, item.stem):
                mine = ", ".join(p.name for p in paths.values() if p.exists())
                raise BcdError(f"{out} already has {mine}, not written by napari-bcd (no done-record); pass "
                               "--overwrite to replace them, or choose another --out folder")
            with open_slide(item.path, mpp=item.mpp) as slide:
                gen = iter_classify(slide, loaded.predictor, settings)
                while True:
                    try:
                        p = next(gen)
                    except StopIteration as stop:
                        cmap = stop.value
                        break
                    if on_progress is not None:
                        on_progress(p)
            summary = summarize(cmap, min_area_mm2=settings.min_area)
            record = {"id": item.stem, "source": source, "model_weights_sha256": loaded.sha, "run": keys,
                      "slide_path": str(item.path), "decision": cmap.info.get("decision"),
                      "precision": cmap.run.precision, "precision_check": cmap.info["precision_check"]}
            write_outputs(cmap, out, stem=item.stem, min_area_mm2=settings.min_area, overwrite=True,
                          summary=summary, record=record)
        return SlideResult(item, "done", seconds=time.perf_counter() - t0, model=loaded.card.name,
                           model_sha256=loaded.sha, summary=summary.to_dict(), run=cmap.run,
                           note="outputs of an interrupted run were computed again" if redo else "",
                           table=summary.table())
    except BcdError as err:
        return SlideResult(item, "failed", error=str(err), seconds=time.perf_counter() - t0)
    except MemoryError:
        return SlideResult(item, "failed", error="not enough memory to read it (is the file what it claims?)")
    except OSError as err:  # the disk or the system refused: one sentence with what to do, the cohort goes on
        return SlideResult(item, "failed", error=os_error_text(err), seconds=time.perf_counter() - t0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # a reader's own error: this slide fails, the cohort goes on and gets its table
        log.debug("slide %s failed", item.path, exc_info=True)
        return SlideResult(item, "failed", error=f"{type(err).__name__}: {err}", seconds=time.perf_counter() - t0)


def _worker_device(device: str) -> str:
    """On a Dask worker with GPUs and ``device="auto"``: one GPU per worker (by its name); else ``device``."""
    import sys

    if device != "auto" or "distributed" not in sys.modules:  # not on a worker: no need to import Dask (0.5 s)
        return device
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return "auto"
    import torch

    n = torch.cuda.device_count()
    if not n:
        return "auto"
    name = str(worker.name)
    index = int(name) if name.isdigit() else abs(hash(name))
    return f"cuda:{index % n}"


# ---------------------------------------------------------------- many slides


def _task(item: CohortItem, out: str, model_path: str | None, settings: ClassifySettings,
          overwrite: bool) -> SlideResult:
    """One slide on a Dask worker (module-level, so it pickles by reference)."""
    return classify_one(item, out, model_path, settings, overwrite=overwrite)


def connect(cluster: str) -> Any:
    """A ``distributed.Client`` for ``local:N`` (a LocalCluster of N processes) or a scheduler address."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise BcdError("--cluster needs Dask distributed: pip install 'napari-bcd[cluster]'.") from err
    if cluster.startswith("local:"):
        n = cluster.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise BcdError(f"--cluster local:N needs a number of worker processes, got {cluster!r}.")
        # Dask's own INFO lines (workers starting and stopping) and the comm errors of an orderly shutdown are
        # not the user's business: only its errors are shown.
        for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny",
                     "distributed.core", "distributed.comm", "distributed.batched"):
            logging.getLogger(name).setLevel(logging.ERROR)
        lc = LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR)
        return Client(lc)
    if "://" not in cluster and ":" not in cluster:
        raise BcdError(f"--cluster {cluster!r} is neither local:N nor a scheduler address such as "
                       "tcp://host:8786.")
    try:
        return Client(cluster, timeout="20s")
    except (OSError, ValueError, TypeError, TimeoutError) as err:
        raise BcdError(f"No Dask scheduler answers at {cluster} ({err}). Start one (dask scheduler) or use "
                       "--cluster local:N.") from err


def iter_cohort(items: list[CohortItem], out: str | os.PathLike[str], model_path: str | None,
                settings: ClassifySettings, *, overwrite: bool = False, client: Any = None, retries: int = 2,
                on_progress: Callable[[CohortItem, Any], None] | None = None) -> Iterator[SlideResult]:
    """Classify every slide; yields each slide's :class:`SlideResult` as it finishes (failures included).

    With ``client`` (a ``distributed.Client``) each slide is one task,
    submitted with ``retries``; a worker that dies loses only the slide it
    was on, which runs again elsewhere.  Without, slides run here one after
    the other with one model.
    """
    out = str(out)
    if client is None:
        for item in items:
            yield classify_one(item, out, model_path, settings, overwrite=overwrite,
                               on_progress=(lambda p, i=item: on_progress(i, p)) if on_progress else None)
        return
    from distributed import as_completed

    futures = {client.submit(_task, item, out, model_path, settings, overwrite, key=f"napari-bcd-{i}-{item.stem}",
                             retries=retries, pure=False): item for i, item in enumerate(items)}
    try:
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                yield fut.result()
            except Exception as err:  # noqa: BLE001 - a task that failed on every try: its slide's row says why
                yield SlideResult(item, "failed", error=f"{type(err).__name__}: {err}")
    finally:
        for fut in futures:
            fut.cancel()


_FIRST = ["id", "slide", "status", "error", "call", "call_probability", "tissue_mm2", "classified_mm2",
          "uncertain_mm2", "windows", "seconds", "windows_per_s", "decode", "precision", "model", "model_sha256",
          "decision", "stain_warning", "note"]


def table_paths(out: str | os.PathLike[str], name: str = TABLE_NAME) -> list[Path]:
    """Where :func:`write_cohort_table` writes (check them with :func:`~napari_bcd._fileio.check_output` first)."""
    return [Path(out) / f"{name}.csv", Path(out) / f"{name}.parquet"]


def write_cohort_table(results: list[SlideResult | dict], out: str | os.PathLike[str],
                       name: str = TABLE_NAME, replace: str = "ours") -> list[Path]:
    """``<out>/cohort.csv`` (and ``cohort.parquet`` with pyarrow): one row per slide, in the given order; a table
    napari-bcd did not write is replaced only with ``replace="any"`` (--overwrite)."""
    from ._fileio import output_file, output_path

    rows = [r.row() if isinstance(r, SlideResult) else dict(r) for r in results]
    cols = [c for c in _FIRST if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r} - set(cols))
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    with output_file(d / f"{name}.csv", "w", replace) as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in cols})
    written.append(d / f"{name}.csv")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    table = pa.table({c: [None if r.get(c) in ("", None) else r.get(c) for r in rows] for c in cols})
    with output_path(d / f"{name}.parquet", replace) as tmp:
        pq.write_table(table, tmp)
    written.append(d / f"{name}.parquet")
    return written
