"""The classification head of the paper's Table II.

=================  ==============  ==========
layer              output (256px)  parameters
=================  ==============  ==========
Conv 1x1 2048->64  8 x 8 x 64      131,136
MaxPool 2          4 x 4 x 64      0
Conv 1x1 64->32    4 x 4 x 32      2,080
Conv 1x1 32->64    4 x 4 x 64      2,112
Dense 64->64       4 x 4 x 64      4,160
Dense 64->32       4 x 4 x 32      2,080
Flatten            512             0
Dense 512->4       4               2,052
=================  ==============  ==========

143,620 trainable parameters.  (The paper prints the two Dense rows' output
shapes swapped; its parameter counts are the ones matched here.)

Activations: the paper names none.  We use ReLU after every hidden conv and
dense layer, as Keras transfer-learning heads conventionally do: without a
non-linearity the five hidden layers would collapse into one linear map and the
head could not learn more than a linear probe.  The last Dense feeds a softmax;
the module returns logits, and :func:`torch.softmax` gives the probabilities
(training uses cross-entropy on the logits, which is numerically safer).

Dense layers act per spatial position, as Keras ``Dense`` does on a 4-D
tensor, and Flatten uses Keras' channels-last order ``(h, w, c)`` so a head
trained in Keras loads and gives the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEADS", "TABLE2_TRAINABLE", "LinearHead", "Table2Head", "build_head"]

TABLE2_TRAINABLE = 143_620


class Table2Head(nn.Module):
    """The Table II head on a ``C x H x W`` feature map.

    Parameters
    ----------
    in_channels
        Channels of the backbone's feature map (2048 for ResNet152V2).
    feature_hw
        Spatial size of the feature map, ``(h, w)`` (8 x 8 for 256-px inputs
        to ResNet152V2).  Flatten fixes it, as in the paper.
    num_classes
        Number of output classes (4 for ICIAR).
    """

    def __init__(self, in_channels: int, feature_hw: tuple[int, int], num_classes: int = 4) -> None:
        super().__init__()
        fh, fw = feature_hw
        ph, pw = fh // 2, fw // 2
        if ph < 1 or pw < 1:
            raise ValueError(f"A {fh}x{fw} feature map is too small for the 2x2 max-pool of the head.")
        self.in_channels = in_channels
        self.feature_hw = (fh, fw)
        self.conv1 = nn.Conv2d(in_channels, 64, 1)
        self.conv2 = nn.Conv2d(64, 32, 1)
        self.conv3 = nn.Conv2d(32, 64, 1)
        self.dense1 = nn.Linear(64, 64)
        self.dense2 = nn.Linear(64, 32)
        self.out = nn.Linear(ph * pw * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = x.permute(0, 2, 3, 1)  # NHWC: Dense per position, Keras flatten order
        x = F.relu(self.dense1(x))
        x = F.relu(self.dense2(x))
        return self.out(x.flatten(1))

    @property
    def first(self) -> nn.Conv2d:
        """The layer that reads the features (where a per-channel standardisation is folded)."""
        return self.conv1

    def keras_layers(self) -> list[tuple[str, nn.Module]]:
        """Weighted layers in Keras order (names are ours; Keras' are positional)."""
        return [
            ("head_conv1", self.conv1),
            ("head_conv2", self.conv2),
            ("head_conv3", self.conv3),
            ("head_dense1", self.dense1),
            ("head_dense2", self.dense2),
            ("head_out", self.out),
        ]


class LinearHead(nn.Module):
    """A logistic regression on the features averaged over the map: what a linear probe is, computed exactly.

    The mean over positions, then one linear layer (``C -> classes``) giving logits.  A training run ships it
    when the tuned probe does at least as well on held-out patients as the Table II head
    (:mod:`napari_bcd.train.select`): with a few dozen images, regularisation decides more than the head's
    architecture, and this head is the best-regularised model those features allow.

    Parameters
    ----------
    in_channels
        Channels of the backbone's feature map.
    num_classes
        Output classes.
    """

    def __init__(self, in_channels: int, num_classes: int = 4) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x.mean(dim=(-2, -1)))

    @property
    def first(self) -> nn.Linear:
        """The layer that reads the (averaged) features."""
        return self.out

    def keras_layers(self) -> list[tuple[str, nn.Module]]:
        return [("head_out", self.out)]


#: The heads a card may name: ``type -> (builder from (channels, feature map (h, w), classes), description)``.
HEADS = {
    "table2": (lambda c, hw, k: Table2Head(c, hw, num_classes=k), "the paper's Table II head"),
    "linear": (lambda c, hw, k: LinearHead(c, num_classes=k), "a logistic regression on the averaged features"),
}


def build_head(kind: str, in_channels: int, feature_hw: tuple[int, int], num_classes: int) -> nn.Module:
    """The head a card's ``head["type"]`` names.

    Raises
    ------
    ValueError
        For a type this version does not know.
    """
    try:
        make = HEADS[kind][0]
    except KeyError:
        raise ValueError(f"Unknown head type {kind!r}; this version knows {', '.join(HEADS)}.") from None
    return make(in_channels, tuple(feature_hw), num_classes)
