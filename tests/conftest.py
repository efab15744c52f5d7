"""Shared fixtures: real H&E pixels, isolated user directories, Keras-written weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from napari_bcd.classes import BACH_CLASSES

os.environ.setdefault("KERAS_BACKEND", "torch")

DATA = Path(__file__).parent / "data"
TISSUE_TILE = DATA / "histolab-tissue-level0-4302-10273-4814-10785.png"


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the real user's cache, settings or default model."""
    root = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("NAPARI_BCD_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("NAPARI_BCD_CONFIG_DIR", str(root / "config"))
    monkeypatch.delenv("NAPARI_BCD_MODEL", raising=False)


@pytest.fixture(scope="session")
def he_256() -> np.ndarray:
    """A real 256 x 256 H&E crop (uint8 RGB)."""
    return load_rgb(TISSUE_TILE)[128:384, 128:384].copy()


@dataclass(frozen=True)
class KerasReference:
    """Weights and outputs of the real Keras Table II model on a real H&E image."""

    keras3_h5: Path  # Keras 3 legacy-H5 layout: "conv1_conv/kernel"
    keras2_h5: Path  # the official file's Keras 2 layout: "conv1_conv/kernel:0"
    image: np.ndarray  # 256 x 256 x 3 uint8
    features: np.ndarray  # backbone output, NHWC as Keras gives it
    probs: np.ndarray  # softmax of the whole model


def keras_table2_model(seed: int = 0):
    """The paper's model built in Keras: ResNet152V2 (no top) + the Table II head."""
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.ResNet152V2(weights=None, include_top=False, input_shape=(256, 256, 3))
    x = base.output
    x = keras.layers.Conv2D(64, 1, activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(32, 1, activation="relu")(x)
    x = keras.layers.Conv2D(64, 1, activation="relu")(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4, activation="softmax")(x)
    return base, keras.Model(base.input, x)


def randomise_bn(model, seed: int) -> None:
    """Non-trivial BN statistics, so a swapped mean/variance or gamma/beta shows."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n).astype("float32"),
                    rng.normal(0, 0.1, n).astype("float32"),
                    rng.normal(0, 0.1, n).astype("float32"),
                    rng.uniform(0.5, 1.5, n).astype("float32"),
                ]
            )


def save_keras_h5(model, path: Path) -> Path:
    """Write weights with Keras' own HDF5 writer (the layout of ``model.save_weights('x.h5')``)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def to_keras2_layout(src: Path, dst: Path) -> Path:
    """Rewrite a Keras 3 file the way Keras 2 wrote it: ``kernel:0`` names, nested groups."""
    import h5py

    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        fout.attrs["layer_names"] = fin.attrs["layer_names"]
        fout.attrs["backend"] = b"tensorflow"
        fout.attrs["keras_version"] = b"2.2.4"
        for name in fin.attrs["layer_names"]:
            name = name.decode() if isinstance(name, bytes) else name
            g = fout.create_group(name)
            names = [n.decode() if isinstance(n, bytes) else n for n in fin[name].attrs["weight_names"]]
            g.attrs["weight_names"] = np.array([(n + ":0").encode() for n in names])
            for n in names:
                g.create_dataset(n + ":0", data=fin[name][n][()])
    return dst


@pytest.fixture(scope="session")
def keras_reference(tmp_path_factory: pytest.TempPathFactory, he_256: np.ndarray) -> KerasReference:
    import keras

    d = tmp_path_factory.mktemp("keras")
    base, model = keras_table2_model()
    randomise_bn(model, seed=1)
    # Random head biases too, so a dropped bias shows.
    for layer in model.layers[-8:]:
        if layer.weights:
            k, b = layer.get_weights()
            layer.set_weights([k, np.random.default_rng(2).normal(0, 0.05, b.shape).astype("float32")])
    x = (he_256[None].astype("float32") / 127.5) - 1.0
    features = np.asarray(keras.ops.convert_to_numpy(base(x, training=False)))
    probs = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    k3 = save_keras_h5(model, d / "table2_keras3.h5")
    k2 = to_keras2_layout(k3, d / "table2_keras2.h5")
    return KerasReference(k3, k2, he_256, features, probs)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


SAMPLE_SLIDE = Path(__file__).parents[1] / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def cmu_rgb() -> np.ndarray:
    """Level 0 of the real CMU Aperio slide: 2967 x 2220 real H&E pixels."""
    import tifffile

    return tifffile.imread(SAMPLE_SLIDE)


def halve(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean((1, 3)).round().astype(np.uint8)


def write_pyramid(
    path: Path,
    image: np.ndarray,
    levels: int = 3,
    mpp: float | None = 0.5,
    compression: str = "jpeg",
    subfiletype: bool = True,
    tile: int = 256,
) -> Path:
    """A generic tiled pyramid TIFF, one page per level, as scanners' converters write it."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        lvl = image
        for i in range(levels):
            kw = {}
            if mpp is not None:
                kw = {"resolution": (1e4 / (mpp * 2**i), 1e4 / (mpp * 2**i)), "resolutionunit": "CENTIMETER"}
            tw.write(
                lvl, tile=(tile, tile), compression=compression, photometric="rgb",
                subfiletype=(1 if i and subfiletype else 0), **kw,
            )
            lvl = halve(lvl)
    return path


def write_ome_subifds(path: Path, image: np.ndarray, levels: int = 3, mpp: float = 0.25) -> Path:
    """An OME-TIFF pyramid in SubIFDs (tifffile README's pyramidal OME-TIFF recipe)."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm"}
        opts = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
        tw.write(image, subifds=levels - 1, metadata=meta, **opts)
        lvl = image
        for _ in range(levels - 1):
            lvl = halve(lvl)
            tw.write(lvl, subfiletype=1, **opts)
    return path


@pytest.fixture(scope="session")
def tiny_model():
    """A small real network (timm resnet18, random weights) with a 200 µm field at 64 px."""
    import torch

    from napari_bcd.model import build_classifier

    torch.manual_seed(0)
    model = build_classifier(
        "timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64), field_um=(200.0, 200.0),
        name="tiny"
    )
    for p in model.head.parameters():  # spread the outputs so several classes appear
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    from napari_bcd.model import save_checkpoint

    return save_checkpoint(tiny_model, path=tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def two_kinds_dataset(root: Path, n: int = 24, px: int = 96) -> Path:
    """Two visibly different kinds of real pixels: nuclei-dense H&E vs pale glass/stroma."""
    from PIL import Image

    rng = np.random.default_rng(0)
    dense = [load_rgb(DATA / "stardist-histo-500x300.jpg"), load_rgb(DATA / "histolab-medium-nuclei-score-level1.png")]
    pale = [load_rgb(DATA / "histolab-almost-white-2.png"), load_rgb(DATA / "histolab-no-tissue.png")]
    rows = []
    for cls, sources in (("Invasive", dense), ("Normal", pale)):
        (root / cls).mkdir(parents=True)
        for k in range(n):
            src = sources[k % len(sources)]
            y = rng.integers(0, src.shape[0] - px)
            x = rng.integers(0, src.shape[1] - px)
            name = f"{cls[:2].lower()}{k:03d}.png"
            Image.fromarray(src[y : y + px, x : x + px]).save(root / cls / name)
            rows.append(f"{name},{cls}")
    (root / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def drain(gen):
    """Run a core generator to the end: ``(everything it yielded, what it returned)``."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


FOUR_KINDS = {
    "Normal": ["histolab-almost-white-2.png", "histolab-no-tissue.png"],
    "Benign": ["histolab-medium-nuclei-score-level1.png"],
    "InSitu": ["stardist-histo-500x300.jpg"],
    "Invasive": ["tiatoolbox-target-1000.png", "histolab-tissue-level0-4302-10273-4814-10785.png"],
}


def four_kinds_dataset(root: Path, n: int = 6, px: int = 96, seed: int = 0, patients: int = 0) -> Path:
    """An ICIAR folder of real H&E crops, four sources standing in for the four classes; with ``patients``, the
    ground truth's third column gives each image a patient (image ``k`` of every class is patient ``k % patients``)."""
    return kinds_dataset(root, FOUR_KINDS, n, px, seed, patients)


def kinds_dataset(root: Path, kinds: dict[str, list[str]], n: int = 6, px: int = 96, seed: int = 0,
                  patients: int = 0) -> Path:
    """A folder of real H&E crops, a class folder per name of ``kinds`` (any names), cut from its files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for cls, files in kinds.items():
        sources = [load_rgb(DATA / f) for f in files]
        (root / cls).mkdir(parents=True)
        for k in range(n):
            src = sources[k % len(sources)]
            y = int(rng.integers(0, src.shape[0] - px))
            x = int(rng.integers(0, src.shape[1] - px))
            name = f"{cls.lower()}{k:03d}.png"
            Image.fromarray(src[y : y + px, x : x + px]).save(root / cls / name)
            rows.append(f"{name},{cls}" + (f",P{k % patients}" if patients else ""))
    (root / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def add_regions(viewer, image, boxes, name: str):
    """A Shapes layer of classified boxes ``(label, class id, (y0, x0, y1, x1))`` in the image's pixels, as the
    Annotations dock would make it."""
    from napari_bcd.annotations import Annotation
    from napari_bcd.annotations.napari import annotations_to_shapes
    from napari_bcd.classes import canonical_class

    anns = [Annotation(label, canonical_class(cls), np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float))
            for label, cls, (y0, x0, y1, x1) in boxes]
    data, kwargs, _ = annotations_to_shapes(anns, scale=tuple(image.scale[-2:]), name=name)
    return viewer.add_shapes(data, **{k: v for k, v in kwargs.items() if k != "metadata"})


def wsinfer_zoo_folder(root: Path, classes: list[str], *, patch_px: int = 100, spacing: float = 2.0,
                       resize: int = 32, seed: int = 0) -> Path:
    """A WSInfer model folder as the zoo and QuPath users have them: a TorchScript network (a small real conv net,
    traced) and a spec-1.0 ``config.json`` with the zoo's transform (Resize, ToTensor, Normalize)."""
    import json

    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, len(classes))).eval()
    with torch.no_grad():
        net[4].weight.mul_(20.0)  # spread the outputs so more than one class appears
    root.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, resize, resize)), str(root / "torchscript_model.pt"))
    config = {"spec_version": "1.0", "architecture": "tinycnn", "num_classes": len(classes), "class_names": classes,
              "patch_size_pixels": patch_px, "spacing_um_px": spacing,
              "transform": [{"name": "Resize", "arguments": {"size": resize}}, {"name": "ToTensor"},
                            {"name": "Normalize", "arguments": {"mean": [0.72, 0.57, 0.68],
                                                                "std": [0.11, 0.15, 0.11]}}]}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root
