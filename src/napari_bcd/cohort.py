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
row per slide as it finishes; :func:`write_cohort_table` writes the cohort
table (CSV, and Parquet when pyarrow is installed).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BcdError

__all__ = ["CohortItem", "CohortSettings", "LoadedModel", "classify_one", "cohort_model", "collect_slides",
           "iter_cohort", "write_cohort_table"]

log = logging.getLogger(__name__)

#: File suffixes taken from a folder (the formats napari-bcd reads; DICOM instances make their folder one slide).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".tf2", ".tf8", ".mrxs", ".scn", ".bif", ".vms", ".vmu")
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


@dataclass(frozen=True)
class CohortSettings:
    """What a classify run does to every slide (``result_keys`` decide whether old outputs still stand)."""

    stride: float = 1.0
    stride_um: float | None = None
    tissue_threshold: float = 0.1
    min_tissue: float = 0.25
    min_area: float = 0.0
    decision: dict | None = None
    batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    workers: int | None = None
    overwrite: bool = False
    stain_normalize: str = "none"
    decode: str = "auto"

    def result_keys(self, mpp: float | None) -> dict:
        """The settings that change the outputs (recorded in each done-record)."""
        return {"stride": self.stride, "stride_um": self.stride_um, "mpp": mpp,
                "tissue_threshold": self.tissue_threshold, "min_tissue": self.min_tissue,
                "min_area_mm2": self.min_area, "decision": self.decision,
                **({"stain_normalize": self.stain_normalize} if self.stain_normalize != "none" else {})}


def _is_slide_folder(folder: Path) -> bool:
    from .io.ngff import is_ngff

    return is_ngff(folder) or any(f.suffix.lower() == ".dcm" for f in folder.iterdir() if f.is_file())


def _slides_in(folder: Path, recursive: bool) -> list[Path]:
    if _is_slide_folder(folder):
        return [folder]  # a DICOM WSI or an OME-Zarr image: the folder is one slide
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for p in sorted(pattern):
        slide_file = p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")
        slide_folder = p.is_dir() and (recursive or p.suffix.lower() == ".zarr") and _is_slide_folder(p)
        if slide_file or slide_folder:
            found.append(p)
    return found


def read_manifest(path: str | os.PathLike[str]) -> list[CohortItem]:
    """A CSV with a ``path`` column (relative paths are from the manifest's folder), optional ``mpp`` and ``id``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BcdError(f"The manifest {p} cannot be read ({err}).") from err
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "path" not in {k.strip().lower() for k in rows[0]}:
        raise BcdError(f"The manifest {p} needs a header with a 'path' column (and optionally 'mpp' and 'id').")
    items = []
    for n, row in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("path"):
            raise BcdError(f"{p}, line {n}: no path.")
        slide = Path(row["path"])
        if not slide.is_absolute():
            slide = p.parent / slide
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                mpp = -1.0
            if not 0 < mpp < 1000:
                raise BcdError(f"{p}, line {n}: mpp must be a positive number of µm per pixel, got {row['mpp']!r}.")
        items.append(CohortItem(str(slide), mpp, row.get("id", "")))
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
            found = _slides_in(p, recursive)
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
class LoadedModel:
    predictor: Any
    sha: str
    card: Any


_MODELS: dict[tuple, LoadedModel] = {}


def cohort_model(model_path: str | None, settings: CohortSettings) -> LoadedModel:
    """The model, loaded once per process (a Dask worker keeps it between slides)."""
    from .model.checkpoint import load_model
    from .model.inference import Predictor

    device = settings.device
    if device == "auto":
        device = _worker_device()
    key = (str(model_path), _mtime(model_path), device, settings.precision, settings.compile)
    if key not in _MODELS:
        model = load_model(model_path)
        _MODELS.clear()
        _MODELS[key] = LoadedModel(Predictor(model, device=device, precision=settings.precision,
                                         compile=settings.compile), model.card.weights_sha256, model.card)
    return _MODELS[key]


def _mtime(model_path: str | None) -> int:
    from .model.card import checkpoint_paths

    if not model_path:
        return 0
    try:
        return checkpoint_paths(model_path)[0].stat().st_mtime_ns
    except OSError:
        return 0


def _worker_device() -> str:
    """On a Dask worker with GPUs: one GPU per worker (by its name); else "auto"."""
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


def _row(item: CohortItem, status: str, **extra) -> dict:
    return {"id": item.stem, "slide": item.path, "status": status, "error": "", **extra}


def _summary_row(summary: dict) -> dict:
    out = {"windows": summary.get("windows", 0), "tissue_mm2": summary.get("tissue_area_mm2"),
           "classified_mm2": summary.get("classified_area_mm2"), "uncertain_mm2": summary.get("uncertain_area_mm2",
                                                                                              0.0),
           "call": summary.get("call") or "", "call_probability": summary.get("call_probability"),
           "decision": summary.get("decision", ""), "stain_warning": summary.get("stain_warning", "")}
    for c in summary.get("classes", []):
        out[f"{c['name']}_mm2"] = c["area_mm2"]
        out[f"{c['name']}_percent"] = c["percent_of_tissue"]
    return out


def classify_one(item: CohortItem, out: str | os.PathLike[str], model_path: str | None,
                 settings: CohortSettings, *, on_progress: Callable[[Any], None] | None = None) -> dict:
    """Classify one slide into ``out`` (or skip it when its outputs stand); returns its cohort-table row.

    Errors a user can act on (a bad file, outputs of another model...) come
    back as a ``failed`` row with the message; nothing is raised for them.
    """
    from .engine import iter_classify
    from .export import output_paths, outputs_complete, slide_lock, write_outputs
    from .io.slide import open_slide
    from .summary import summarize
    from .tissue import TissueParams

    t0 = time.perf_counter()
    out = Path(out)
    try:
        loaded = cohort_model(model_path, settings)
        keys = settings.result_keys(item.mpp)
        with slide_lock(out, item.stem):
            paths = output_paths(out, item.stem)
            done = outputs_complete(out, item.stem)
            if done is not None and not settings.overwrite:
                same = (done.get("model_weights_sha256") == loaded.sha and done.get("settings") == keys)
                if same:
                    summary = json.loads(paths["summary_json"].read_text(encoding="utf-8"))
                    return _row(item, "skipped", seconds=0.0, model=loaded.card.name, model_sha256=loaded.sha,
                                **_summary_row(summary), note="outputs complete from this model and settings")
                raise BcdError(f"outputs already exist in {out} ({paths['labels'].name}…) from another model or other "
                               "settings; pass --overwrite to replace them")
            redo = done is None and any(p.exists() for p in paths.values())
            with open_slide(item.path, mpp=item.mpp) as slide:
                gen = iter_classify(slide, loaded.predictor, stride=settings.stride, stride_um=settings.stride_um,
                                    batch_size=settings.batch_size,
                                    tissue=TissueParams(threshold=settings.tissue_threshold),
                                    min_tissue=settings.min_tissue, workers=settings.workers,
                                    decision=settings.decision, stain_normalize=settings.stain_normalize,
                                    decode=settings.decode)
                while True:
                    try:
                        p = next(gen)
                    except StopIteration as stop:
                        cmap = stop.value
                        break
                    if on_progress is not None:
                        on_progress(p)
            summary = summarize(cmap, min_area_mm2=settings.min_area)
            record = {"id": item.stem, "model_weights_sha256": loaded.sha, "settings": keys,
                      "slide_path": str(item.path), "decision": cmap.info.get("decision")}
            write_outputs(cmap, out, stem=item.stem, min_area_mm2=settings.min_area, overwrite=True,
                          summary=summary, record=record)
        row = _row(item, "done", seconds=round(time.perf_counter() - t0, 3), model=loaded.card.name,
                   model_sha256=loaded.sha, windows_per_s=cmap.info.get("windows_per_s", 0.0),
                   decode=cmap.info.get("decode", "cpu"),
                   **_summary_row(summary.to_dict()))
        if redo:
            row["note"] = "outputs of an interrupted run were computed again"
        row["table"] = summary.table()
        return row
    except BcdError as err:
        return _row(item, "failed", error=str(err), seconds=round(time.perf_counter() - t0, 3))
    except MemoryError:
        return _row(item, "failed", error="not enough memory to read it (is the file what it claims?)")


# ---------------------------------------------------------------- many slides


def _task(item: CohortItem, out: str, model_path: str | None, settings: CohortSettings) -> dict:
    """One slide on a Dask worker (module-level, so it pickles by reference)."""
    return classify_one(item, out, model_path, settings)


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
        lc = LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True, dashboard_address=":0")
        return Client(lc)
    try:
        return Client(cluster, timeout="20s")
    except OSError as err:
        raise BcdError(f"No Dask scheduler answers at {cluster} ({err}). Start one (dask scheduler) or use "
                       "--cluster local:N.") from err


def iter_cohort(items: list[CohortItem], out: str | os.PathLike[str], model_path: str | None,
                settings: CohortSettings, *, client: Any = None, retries: int = 2,
                on_progress: Callable[[CohortItem, Any], None] | None = None) -> Iterator[dict]:
    """Classify every slide; yields each slide's row as it finishes (failures included).

    With ``client`` (a ``distributed.Client``) each slide is one task,
    submitted with ``retries``; a worker that dies loses only the slide it
    was on, which runs again elsewhere.  Without, slides run here one after
    the other with one model.
    """
    out = str(out)
    if client is None:
        for item in items:
            yield classify_one(item, out, model_path, settings,
                               on_progress=(lambda p, i=item: on_progress(i, p)) if on_progress else None)
        return
    from distributed import as_completed

    futures = {client.submit(_task, item, out, model_path, settings, key=f"napari-bcd-{i}-{item.stem}",
                             retries=retries, pure=False): item for i, item in enumerate(items)}
    try:
        for fut in as_completed(futures):
            item = futures[fut]
            try:
                yield fut.result()
            except Exception as err:  # noqa: BLE001 - a task that failed on every try: its slide's row says why
                yield _row(item, "failed", error=f"{type(err).__name__}: {err}")
    finally:
        for fut in futures:
            fut.cancel()


_FIRST = ["id", "slide", "status", "error", "call", "call_probability", "tissue_mm2", "classified_mm2",
          "uncertain_mm2", "windows", "seconds", "windows_per_s", "decode", "model", "model_sha256", "decision",
          "stain_warning", "note"]


def write_cohort_table(rows: list[dict], out: str | os.PathLike[str], name: str = TABLE_NAME) -> list[Path]:
    """``<out>/cohort.csv`` (and ``cohort.parquet`` with pyarrow): one row per slide, in the given order."""
    from ._fileio import atomic_path, atomic_write

    rows = [{k: v for k, v in r.items() if k != "table"} for r in rows]
    cols = [c for c in _FIRST if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r} - set(cols))
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    with atomic_write(d / f"{name}.csv", "w") as fh:
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
    with atomic_path(d / f"{name}.parquet") as tmp:
        pq.write_table(table, tmp)
    written.append(d / f"{name}.parquet")
    return written

