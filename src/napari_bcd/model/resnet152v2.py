"""ResNet152V2 in the Keras layout, as a torch module.

This reproduces ``keras.applications.ResNet152V2(include_top=False)`` layer for
layer so the official Keras ImageNet weights load without loss:

* pre-activation bottleneck blocks, ``[3, 8, 36, 3]`` per stage;
* the stride sits on the LAST block of stages 2-4, whose shortcut is a 1x1
  max-pool (Keras ``MaxPooling2D(1, strides=2)``), not on the first block as in
  timm's ``resnetv2_152``;
* biases on the stem conv, on each projection (``_0_conv``) and each block's
  last 1x1 conv (``_3_conv``);
* the stem max-pool pads with zeros, not -inf (Keras ``ZeroPadding2D`` then
  ``MaxPooling2D``), which matters because the stem conv output is signed;
* BatchNorm eps 1.001e-5 and a final ``post_bn`` + ReLU.

Input: NCHW float, preprocessed the Keras "tf" way (``x / 127.5 - 1``).
Output: NCHW features, ``2048 x H/32 x W/32``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KERAS_PARAM_COUNT", "ResNet152V2", "keras_param_count"]

#: Keras' count for include_top=False: parameters plus BN moving statistics.
KERAS_PARAM_COUNT = 58_331_648
BN_EPS = 1.001e-5
# Keras BN momentum 0.99 updates moving = 0.99 * moving + 0.01 * batch.
BN_MOMENTUM = 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class Block(nn.Module):
    """One pre-activation bottleneck (Keras ``residual_block_v2``)."""

    def __init__(self, in_ch: int, filters: int, stride: int, conv_shortcut: bool, name: str) -> None:
        super().__init__()
        self.keras_name = name
        self.stride = stride
        self.preact_bn = _bn(in_ch)
        # Keras' conv shortcut takes the pre-activated input; the identity and
        # max-pool shortcuts take the raw input.
        self.shortcut = nn.Conv2d(in_ch, 4 * filters, 1, stride=stride, bias=True) if conv_shortcut else None
        self.conv1 = nn.Conv2d(in_ch, filters, 1, bias=False)
        self.bn1 = _bn(filters)
        # ZeroPadding2D(1) + valid 3x3 conv == symmetric padding=1, any stride.
        self.conv2 = nn.Conv2d(filters, filters, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(filters)
        self.conv3 = nn.Conv2d(filters, 4 * filters, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.preact_bn(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        elif self.stride > 1:
            shortcut = x[:, :, :: self.stride, :: self.stride]  # MaxPooling2D(1, strides=s)
        else:
            shortcut = x
        y = F.relu(self.bn1(self.conv1(preact)))
        y = F.relu(self.bn2(self.conv2(y)))
        return shortcut + self.conv3(y)

    def keras_layers(self) -> list[tuple[str, nn.Module]]:
        """(Keras layer name, module) pairs in Keras order."""
        n = self.keras_name
        pairs: list[tuple[str, nn.Module]] = [(f"{n}_preact_bn", self.preact_bn)]
        if self.shortcut is not None:
            pairs.append((f"{n}_0_conv", self.shortcut))
        pairs += [
            (f"{n}_1_conv", self.conv1),
            (f"{n}_1_bn", self.bn1),
            (f"{n}_2_conv", self.conv2),
            (f"{n}_2_bn", self.bn2),
            (f"{n}_3_conv", self.conv3),
        ]
        return pairs


class ResNet152V2(nn.Module):
    """The Keras ResNet152V2 feature extractor (``include_top=False``).

    Parameters
    ----------
    blocks
        Blocks per stage; ``(3, 8, 36, 3)`` is ResNet152V2 (``(3, 4, 6, 3)``
        would be ResNet50V2, handy for quick tests of the layout).
    """

    #: Total stride of the feature map.
    reduction = 32
    num_features = 2048

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 8, 36, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True)
        stages = []
        in_ch = 64
        for i, (filters, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            last_stride = 1 if i == 3 else 2
            layers = []
            for b in range(1, n + 1):
                layers.append(
                    Block(
                        in_ch,
                        filters,
                        stride=last_stride if b == n else 1,
                        conv_shortcut=b == 1,
                        name=f"conv{i + 2}_block{b}",
                    )
                )
                in_ch = 4 * filters
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.post_bn = _bn(in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        # Keras pads with zeros before the stem max-pool; the conv output is
        # signed, so -inf padding (torch's default) would give other values.
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2)
        x = self.stages(x)
        return F.relu(self.post_bn(x))

    def keras_layers(self) -> list[tuple[str, nn.Module]]:
        """(Keras layer name, module) pairs of every weighted layer, in Keras order."""
        pairs: list[tuple[str, nn.Module]] = [("conv1_conv", self.conv1)]
        for stage in self.stages:
            for block in stage:
                pairs += block.keras_layers()
        pairs.append(("post_bn", self.post_bn))
        return pairs


def keras_param_count(module: nn.Module) -> int:
    """Count parameters as Keras does: trainable weights plus BN moving statistics."""
    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            assert m.running_mean is not None and m.running_var is not None
            n += m.running_mean.numel() + m.running_var.numel()
    return n
