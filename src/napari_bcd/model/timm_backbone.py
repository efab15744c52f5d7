"""Any timm model as the backbone: its feature map, NCHW, whatever the model's own layout."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import BcdError

__all__ = ["TimmBackbone"]


def _resolved(args: dict[str, Any]) -> dict[str, Any]:
    """A card's JSON-able timm arguments as timm takes them: layer names become the layers."""
    out = dict(args)
    if out.get("mlp_layer") == "SwiGLUPacked":
        from timm.layers import SwiGLUPacked

        out["mlp_layer"] = SwiGLUPacked
    if out.get("act_layer") == "silu":
        out["act_layer"] = nn.SiLU
    return out


class TimmBackbone(nn.Module):
    """Any timm model as a feature extractor giving an NCHW map.

    Transformers' token sequences (``N x tokens x C``) are turned into a map by
    dropping the prefix (class/register) tokens and folding the patch tokens
    back onto their grid, so the Table II head sees the same kind of input.
    """

    def __init__(self, name: str, pretrained: bool = False, hub: str = "", **args: Any) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:  # pragma: no cover - timm is a dependency
            raise ImportError("timm backbones need timm: pip install timm") from err
        try:
            self.model = timm.create_model(f"hf-hub:{hub}" if hub else name, pretrained=pretrained, num_classes=0,
                                           global_pool="", **_resolved(args))
        except RuntimeError as err:
            raise BcdError(f"timm has no model {name!r}: {err}. See timm.list_models().") from err
        except OSError as err:
            raise BcdError(
                f"Could not get pretrained weights for timm model {name!r} ({err}). When offline, pass "
                "backbone_weights=PATH (--backbone-weights) with a local safetensors or state-dict file."
            ) from err
        self.name = name
        self.num_features = int(getattr(self.model, "num_features", 0))
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_map(self.model.forward_features(x), x.shape[-2:])

    def to_map(self, y: torch.Tensor, hw: torch.Size) -> torch.Tensor:
        """timm's ``forward_features`` output (tokens, NHWC or NCHW) as an NCHW feature map for input size ``hw``."""
        if y.ndim == 3:
            tokens = y[:, self.num_prefix_tokens :]
            gh, gw = self._grid(hw, tokens.shape[1])
            y = tokens.transpose(1, 2).reshape(y.shape[0], y.shape[2], gh, gw)
        elif y.ndim == 4 and y.shape[1] != self.num_features and y.shape[-1] == self.num_features:
            y = y.permute(0, 3, 1, 2)  # NHWC models (some ConvNeXt/Swin variants)
        return y

    def _grid(self, hw: torch.Size, n: int) -> tuple[int, int]:
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else patch
            gh, gw = int(hw[0]) // ph, int(hw[1]) // pw
            if gh * gw == n:
                return gh, gw
        side = int(round(n**0.5))
        if side * side != n:
            raise BcdError(f"Cannot fold {n} tokens into a feature map; use a square input_px.")
        return side, side
