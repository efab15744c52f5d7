"""Read Keras HDF5 weights files into the Keras-layout torch modules.

The layout (Keras 2 ``save_weights``/``save`` and Keras 3's legacy H5 writer):
root attribute ``layer_names``; a group per layer whose attribute
``weight_names`` lists datasets such as ``conv1_conv/kernel:0`` (Keras 2) or
``conv1_conv/kernel`` (Keras 3).  A whole-model ``.h5`` keeps the same tree
under ``model_weights``; a backbone nested in a bigger model is a group whose
weight names carry the inner layer names.  Conv kernels are HWIO (torch wants
OIHW), Dense kernels are ``(in, out)``, BN keeps gamma, beta, moving mean and
variance.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import KerasWeightsError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_keras_weights", "read_keras_h5"]

_BN_VARS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _text(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _attr_list(group, name: str) -> list[str]:
    """A list attribute, also when Keras split it into ``name0``, ``name1``... (large models)."""
    if name in group.attrs:
        return [_text(n) for n in group.attrs[name]]
    out: list[str] = []
    i = 0
    while f"{name}{i}" in group.attrs:
        out += [_text(n) for n in group.attrs[f"{name}{i}"]]
        i += 1
    return out


def read_keras_h5(path: str | os.PathLike[str]) -> OrderedDict[str, dict[str, np.ndarray]]:
    """Return ``{layer name: {variable name: array}}`` in file order.

    Raises
    ------
    KerasWeightsError
        When the file is not HDF5 or not in the Keras weights layout.
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise KerasWeightsError(f"{p} does not exist. Give the path of a Keras .h5 weights file.")
    try:
        f = h5py.File(p, "r")
    except OSError as err:
        raise KerasWeightsError(f"{p} is not an HDF5 file ({err}). Give a Keras .h5 weights file.") from err
    layers: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
    with f:
        root = f["model_weights"] if "model_weights" in f and not _attr_list(f, "layer_names") else f
        layer_names = _attr_list(root, "layer_names")
        if not layer_names:
            hint = " (a Keras 3 '.weights.h5' file: save it with the legacy H5 writer)" if "layers" in f else ""
            raise KerasWeightsError(
                f"{p} is HDF5 but not a Keras weights file: it has no 'layer_names' attribute{hint}."
            )
        for group_name in layer_names:
            group = root[group_name]
            for wn in _attr_list(group, "weight_names"):
                parts = wn.removesuffix(":0").split("/")
                layer = parts[-2] if len(parts) >= 2 else group_name
                layers.setdefault(layer, {})[parts[-1]] = np.asarray(group[wn])
    return layers


def _assign(module, var: str, array: np.ndarray, layer: str, path: Path) -> None:
    import torch
    from torch import nn

    file_shape = array.shape
    if isinstance(module, nn.Conv2d):
        target = {"kernel": "weight", "bias": "bias"}.get(var)
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif isinstance(module, nn.Linear):
        target = {"kernel": "weight", "bias": "bias"}.get(var)
        if var == "kernel":
            array = array.T
    elif isinstance(module, nn.BatchNorm2d):
        target = _BN_VARS.get(var)
    else:  # pragma: no cover - only the module types above carry weights
        target = None
    tensor = getattr(module, target, None) if target else None
    if tensor is None:
        raise KerasWeightsError(f"{path}: layer {layer!r} has a variable {var!r} that a {type(module).__name__} has "
                                "not.")
    if tuple(tensor.shape) != array.shape:
        want = tuple(tensor.shape)
        if var == "kernel" and len(want) == 4:
            want = (want[2], want[3], want[1], want[0])  # OIHW -> Keras HWIO
        elif var == "kernel" and len(want) == 2:
            want = want[::-1]
        raise KerasWeightsError(
            f"{path}: layer {layer!r} variable {var!r} has shape {file_shape}, the network expects "
            f"{want}. The file is for another network."
        )
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(array)))


def _expected_vars(module) -> set[str]:
    from torch import nn

    if isinstance(module, nn.BatchNorm2d):
        return set(_BN_VARS)
    return {"kernel", "bias"} if module.bias is not None else {"kernel"}


def load_keras_weights(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a Keras HDF5 weights file into a Keras-layout module, in place.

    Parameters
    ----------
    module
        A :class:`~napari_bcd.model.ResNet152V2`, a :class:`~napari_bcd.model.Table2Head`
        or a whole classifier built on the ResNet152V2 backbone.  Backbone layers
        are matched by their Keras names; the head's six weighted layers, whose
        Keras names are generated (``conv2d``, ``dense_1``...), by their order
        after the backbone.
    path
        A Keras 2 (``kernel:0``) or Keras 3 (``kernel``) HDF5 weights file, e.g.
        the official ``resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5``.

    Raises
    ------
    KerasWeightsError
        Naming the first layer that is missing or does not fit.
    """
    p = Path(path)
    file_layers = read_keras_h5(p)
    backbone = getattr(module, "backbone", module)
    head = getattr(module, "head", None) if backbone is not module else None
    named = backbone.keras_layers() if hasattr(backbone, "keras_layers") else []
    positional = head.keras_layers() if head is not None else []
    if not named and hasattr(module, "keras_layers"):  # a bare head
        positional = module.keras_layers()
    if not named and not positional:
        raise KerasWeightsError(
            f"{type(module).__name__} has no Keras layout; Keras weights load only into the ResNet152V2 backbone."
        )
    seen = f"{len(file_layers)} weighted layers" + (f", the first {next(iter(file_layers))!r}" if file_layers else "")
    for name, sub in named:
        if name not in file_layers:
            raise KerasWeightsError(
                f"{p} has no layer {name!r} ({seen}): it is not a ResNet152V2 weights file. "
                "Use the official resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5."
            )
        _load_layer(sub, name, file_layers[name], p)
    if positional:
        names = {n for n, _ in named}
        rest = [(n, v) for n, v in file_layers.items() if n not in names]
        if len(rest) < len(positional):
            missing = positional[len(rest)][0]
            raise KerasWeightsError(
                f"{p} holds {len(rest)} weighted layers after the backbone; the Table II head needs "
                f"{len(positional)} (first missing: {missing}). Use a file saved from the whole Keras model, "
                "or load only the backbone."
            )
        for (ours, sub), (theirs, variables) in zip(positional, rest, strict=False):
            _load_layer(sub, f"{theirs} (our {ours})", variables, p)


def _load_layer(sub, name: str, variables: dict[str, np.ndarray], p: Path) -> None:
    want = _expected_vars(sub)
    if set(variables) != want:
        raise KerasWeightsError(
            f"{p}: layer {name!r} holds {sorted(variables)}, the network expects {sorted(want)}. "
            "The file is for another network."
        )
    for var, array in variables.items():
        _assign(sub, var, array, name, p)
