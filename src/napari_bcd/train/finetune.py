"""Fine-tuning the Table II head (the paper's protocol), features cached once.

With the backbone frozen, the backbone's output for an image never changes,
so it is computed once per image and per augmentation (the eight flips and
rotations) and cached on disk, keyed by the backbone's weights hash and the
image's content hash.  Every epoch then trains the 143,620-parameter head on
cached features: epochs after the first cost almost nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .evaluate import report_from_predictions
from .iciar import Dataset

__all__ = ["EpochStats", "FeatureProgress", "dihedral", "iter_finetune", "split_dataset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureProgress:
    """Backbone features computed (or found in the cache) so far."""

    done: int
    total: int
    cached: int


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    best: bool


def dihedral(img: np.ndarray, t: int) -> np.ndarray:
    """The ``t``-th of the eight flips/rotations (0 = identity)."""
    out = np.rot90(img, t % 4)
    return np.ascontiguousarray(out[:, ::-1] if t >= 4 else out)


def split_dataset(
    dataset: Dataset, val_fraction: float = 0.2, seed: int = 0, split_file: str | os.PathLike[str] | None = None
) -> tuple[list[int], list[int], str]:
    """Train/validation indices: a split file (validation file names, one per line) or a stratified split."""
    n = len(dataset)
    if split_file is not None:
        names = {line.strip() for line in Path(split_file).read_text(encoding="utf-8").splitlines() if line.strip()}
        names = {Path(s).name for s in names}
        val = [i for i, p in enumerate(dataset.paths) if p.name in names]
        missing = names - {dataset.paths[i].name for i in val}
        if missing:
            raise DatasetError(f"The split file lists {len(missing)} file(s) not in the dataset, e.g. {sorted(missing)[0]}.")
        train = [i for i in range(n) if i not in set(val)]
        return train, val, f"file:{Path(split_file).name}"
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
    stratify = dataset.labels if counts[counts > 0].min() >= 2 else None
    if stratify is None:
        log.warning("A class has fewer than 2 images: the split is not stratified.")
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    return sorted(tr.tolist()), sorted(va.tolist()), f"stratified {1 - val_fraction:.0%}/{val_fraction:.0%}, seed {seed}"


def _image_key(dataset: Dataset, i: int) -> str:
    h = hashlib.sha256()
    with open(dataset.paths[i], "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_finetune(
    dataset: Dataset,
    *,
    out: str | os.PathLike[str],
    backbone: str = "resnet152v2",
    backbone_weights: str | os.PathLike[str] | None = "imagenet",
    input_px: tuple[int, int] = (256, 256),
    field_um: tuple[float, float] | None = None,
    preprocessing=None,
    epochs: int = 25,
    lr: float = 1e-4,
    batch_size: int = 128,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | os.PathLike[str] | None = None,
    augment: bool = True,
    finetune_last_stage: bool = False,
    device: str | None = None,
    feature_batch: int = 8,
    name: str | None = None,
    cache: bool = True,
) -> Generator[FeatureProgress | EpochStats, None, Path]:
    """Train the Table II head on an ICIAR dataset; yields progress, returns the checkpoint path.

    The paper's protocol is the default: frozen ImageNet ResNet152V2, Adam
    lr 1e-4, batch 128, 25 epochs, stratified 80/20 split.  The checkpoint of
    the best epoch by validation loss is written to ``out`` (atomically)
    whenever it improves, so cancelling (closing the generator) keeps the
    best so far.  ``finetune_last_stage`` also trains the backbone's last
    stage (features are then recomputed every epoch, no cache).
    """
    import torch
    from torch import nn

    from ..config import cache_dir
    from ..engine import _resize_area
    from ..model.checkpoint import save_checkpoint, weights_sha256
    from ..model.classifier import build_classifier
    from ..model.inference import choose_device

    if len(dataset) < 2:
        raise DatasetError("Training needs at least two images.")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise DatasetError("epochs and batch size must be at least 1 and the learning rate positive.")
    dev = choose_device(device)
    torch.manual_seed(seed)
    model = build_classifier(backbone, backbone_weights=backbone_weights, input_px=input_px, field_um=field_um,
                             preprocessing=preprocessing, classes=tuple(dataset.classes))
    train_idx, val_idx, split_desc = split_dataset(dataset, val_fraction, seed, split_file)
    if not val_idx or not train_idx:
        raise DatasetError("The split left no training or no validation images; use more images or another split.")
    model.to(dev)
    T = 8 if augment else 1
    labels = torch.as_tensor(dataset.labels)

    def images_of(i: int) -> np.ndarray:
        return _resize_area(dataset.load(i), model.card.input_px)

    # ---- features, once
    feats: dict[int, torch.Tensor] = {}
    if not finetune_last_stage:
        model.backbone.eval()
        bkey = weights_sha256(model.backbone.state_dict())[:16]
        pkey = hashlib.sha256(repr((model.card.input_px, model.card.preprocessing, T)).encode()).hexdigest()[:8]
        cdir = cache_dir() / "features" / f"{bkey}-{pkey}"
        if cache:
            cdir.mkdir(parents=True, exist_ok=True)
        needed = sorted(set(train_idx) | set(val_idx))
        from safetensors.torch import load_file, save_file

        cached_n = 0
        yield FeatureProgress(0, len(needed), 0)
        todo: list[int] = []
        keys: dict[int, str] = {}
        for i in needed:
            keys[i] = _image_key(dataset, i)
            f = cdir / f"{keys[i]}.safetensors"
            if cache and f.is_file():
                try:
                    feats[i] = load_file(str(f))["features"]
                    cached_n += 1
                    continue
                except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                    f.unlink(missing_ok=True)
            todo.append(i)
        done = cached_n
        yield FeatureProgress(done, len(needed), cached_n)
        per = max(1, feature_batch // T) if T > 1 else feature_batch
        for k in range(0, len(todo), per):
            chunk = todo[k : k + per]
            batch = np.stack([dihedral(images_of(i), t) for i in chunk for t in range(T)])
            with torch.inference_mode():
                x = model.normalise(torch.from_numpy(batch).to(dev))
                out_f = model.backbone(x).to("cpu", torch.float16)
            for j, i in enumerate(chunk):
                feats[i] = out_f[j * T : (j + 1) * T].clone(memory_format=torch.contiguous_format)
                if cache:
                    tmp = cdir / f".{keys[i]}.{os.getpid()}.tmp"
                    save_file({"features": feats[i]}, str(tmp))
                    os.replace(tmp, cdir / f"{keys[i]}.safetensors")
            done += len(chunk)
            yield FeatureProgress(done, len(needed), cached_n)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        last = _last_stage(model)
        for p in last.parameters():
            p.requires_grad_(True)
        images = {i: images_of(i) for i in sorted(set(train_idx) | set(val_idx))}

    if feats:
        # One contiguous bank: a batch is then one gather, not 128 small copies.
        rows = {i: r for r, i in enumerate(sorted(feats))}
        bank = torch.stack([feats[i] for i in sorted(feats)])
        feats.clear()
        row_of = np.zeros(len(dataset), np.int64)
        for i, r in rows.items():
            row_of[i] = r
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    pairs = np.array([(i, t) for i in train_idx for t in range(T)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    best_loss = float("inf")
    out_path = Path(out)

    def forward(idx: np.ndarray, ts: np.ndarray, train: bool) -> torch.Tensor:
        if not finetune_last_stage:
            f = bank[torch.from_numpy(row_of[idx]), torch.from_numpy(np.asarray(ts, np.int64))]
            return model.head(f.to(dev, torch.float32))
        batch = np.stack([dihedral(images[int(i)], int(t)) for i, t in zip(idx, ts, strict=True)])
        x = model.normalise(torch.from_numpy(batch).to(dev))
        return model(x)

    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        model.backbone.eval()  # BN statistics stay ImageNet's (as Keras' frozen layers)
        if finetune_last_stage:
            _last_stage(model).train()
        order = pairs[rng.permutation(len(pairs))]
        tot_loss, tot_ok = 0.0, 0
        for k in range(0, len(order), batch_size):
            b = order[k : k + batch_size]
            logits = forward(b[:, 0], b[:, 1], True)
            y = labels[b[:, 0]].to(dev)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss) * len(b)
            tot_ok += int((logits.argmax(1) == y).sum())
        model.eval()
        va = np.asarray(val_idx, np.int64)
        with torch.inference_mode():
            v_logits = torch.cat([forward(va[k : k + batch_size], np.zeros(len(va[k : k + batch_size]), np.int64), False)
                                  for k in range(0, len(va), batch_size)])
        v_y = labels[va].to(dev)
        v_loss = float(loss_fn(v_logits, v_y))
        v_pred = v_logits.argmax(1)
        v_acc = float((v_pred == v_y).float().mean())
        stats = EpochStats(epoch, epochs, tot_loss / len(order), tot_ok / len(order), v_loss, v_acc,
                           time.perf_counter() - t0, v_loss < best_loss)
        history.append({k: getattr(stats, k) for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")})
        if stats.best:
            best_loss = v_loss
            report = report_from_predictions(v_y.cpu().tolist(), v_pred.cpu().tolist(), dataset.classes)
            card = model.card.replace(
                name=name or out_path.stem,
                training={
                    "data": {"root": str(dataset.root), "counts": dataset.counts(), "images": len(dataset)},
                    "split": {"kind": split_desc, "train": len(train_idx), "val": len(val_idx),
                              "val_files": [dataset.paths[i].name for i in val_idx]},
                    "hyperparameters": {"optimizer": "Adam", "lr": lr, "batch_size": batch_size, "epochs": epochs,
                                        "augment": "8 dihedral" if augment else "none", "seed": seed,
                                        "finetune_last_stage": finetune_last_stage, "loss": "cross-entropy"},
                    "best_epoch": epoch,
                    "curves": list(history),
                    "validation_report": report.to_dict(),
                },
                metrics={"accuracy": report.accuracy, "macro_f1": report.macro["f1"],
                         "weighted_f1": report.weighted["f1"], "val_loss": v_loss},
            )
            model.cpu()
            save_checkpoint(model, card, out_path)
            model.to(dev)
        yield stats
    from ..model.checkpoint import checkpoint_paths

    return checkpoint_paths(out_path)[0]


def _last_stage(model):
    """The backbone's last stage (+ its final norm), trainable with ``finetune_last_stage``."""
    from torch import nn

    bb = model.backbone
    if hasattr(bb, "stages"):
        return nn.ModuleList([bb.stages[-1], bb.post_bn])
    inner = getattr(bb, "model", bb)
    for name in ("layer4", "stages", "blocks"):
        part = getattr(inner, name, None)
        if part is not None:
            return part[-1] if hasattr(part, "__getitem__") else part
    raise DatasetError("This backbone has no recognisable last stage to fine-tune.")
