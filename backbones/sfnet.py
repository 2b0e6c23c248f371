"""OpenSphere's SFNet-20 without normalisation layers (the SphereFace backbone of the paper), in OpenSphere's
three layouts.

All three: conv biases, ReLU, no BatchNorm. Each of the four stages opens with a stride-2 3x3 conv + ReLU and
continues with residual blocks of two 3x3 convs (1, 2, 4, 1 blocks); the 512x7x7 map is flattened into a
linear layer. They differ in the stage opener's name and in where a block's last ReLU sits:

- ``sfnet20`` (OpenSphere's current ``sfnet20``, module/backbone/sfnet.py): opener ``conv1``;
  block output relu(x + conv2(relu(conv1(x)))).
- ``sfnet20_deprecated`` (``sfnet20_deprecated`` of OpenSphere's SphereFace2_ICLR21 branch): opener ``conv``;
  block output x + relu(conv2(relu(conv1(x)))).
- ``sfnet20_deprecated_v0`` (``sfnet20_deprecated`` of the OpenSphere_v0 tag, used by its SFNet-20 configs):
  opener ``conv1``; block output x + relu(conv2(relu(conv1(x)))).

``sfnet20`` and ``sfnet20_deprecated_v0`` have identical state-dict keys and shapes: only the forward differs.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from backbones.architectures import register_architecture

__all__ = ["SFNet", "SFNET_LAYOUTS", "sfnet20", "sfnet20_deprecated", "sfnet20_deprecated_v0"]


SFNET_LAYOUTS: dict[str, str] = {
    "sfnet20": "current OpenSphere; ReLU after the residual add",
    "sfnet20_deprecated": "OpenSphere's SphereFace2_ICLR21 branch; stage opener named 'conv'",
    "sfnet20_deprecated_v0": "OpenSphere v0's sfnet20_deprecated; ReLU before the residual add",
}


class _Opener(nn.Module):
    """A stage's stride-2 3x3 conv + ReLU, its conv attribute named as in the layout's checkpoints."""

    def __init__(self, cin: int, cout: int, name: str):
        super().__init__()
        self.conv_name = name
        self.add_module(name, nn.Conv2d(cin, cout, 3, 2, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, self.conv_name)(x))


class _Block(nn.Module):
    """Residual block of two 3x3 convs; ``relu_after_add`` places the last ReLU after (True) or before the add."""

    def __init__(self, planes: int, relu_after_add: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.relu_after_add = relu_after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(F.relu(self.conv1(x)))
        return F.relu(x + branch) if self.relu_after_add else x + F.relu(branch)


class SFNet(nn.Module):
    """SFNet without normalisation layers; ``opener`` and ``relu_after_add`` select the OpenSphere layout."""

    def __init__(self, blocks: tuple[int, ...] = (1, 2, 4, 1), num_features: int = 512, opener: str = "conv1",
                 relu_after_add: bool = True):
        super().__init__()
        cin = 3
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stage = nn.Sequential(_Opener(cin, width, opener), *[_Block(width, relu_after_add) for _ in range(n)])
            self.add_module(f"layer{i}", stage)
            cin = width
        self.fc = nn.Linear(512 * 7 * 7, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # type: ignore[operator]  # add_module's stages
        return self.fc(torch.flatten(x, 1))


@register_architecture("sfnet20", help=SFNET_LAYOUTS["sfnet20"])
def sfnet20(num_features: int = 512, **_: object) -> SFNet:
    """Current OpenSphere ``sfnet20`` (no BN): opener ``conv1``, ReLU after the residual add."""
    return SFNet(num_features=num_features, opener="conv1", relu_after_add=True)


@register_architecture("sfnet20_deprecated", help=SFNET_LAYOUTS["sfnet20_deprecated"])
def sfnet20_deprecated(num_features: int = 512, **_: object) -> SFNet:
    """OpenSphere SphereFace2_ICLR21 branch's ``sfnet20_deprecated``: opener ``conv``, ReLU before the add."""
    return SFNet(num_features=num_features, opener="conv", relu_after_add=False)


@register_architecture("sfnet20_deprecated_v0", help=SFNET_LAYOUTS["sfnet20_deprecated_v0"])
def sfnet20_deprecated_v0(num_features: int = 512, **_: object) -> SFNet:
    """OpenSphere v0's ``sfnet20_deprecated``: opener ``conv1`` (sfnet20's very keys), ReLU before the add."""
    return SFNet(num_features=num_features, opener="conv1", relu_after_add=False)
