"""OpenSphere's SFNet-20 (the SphereFace backbone of the paper), in both of OpenSphere's variants.

No normalisation layers, conv biases, ReLU. Each stage opens with a stride-2 3x3 conv + ReLU and continues
with residual blocks of two 3x3 convs; the 512x7x7 map is flattened into a linear layer.
- ``sfnet20_deprecated``: stage opener named ``conv``; block output = x + relu(conv2(relu(conv1(x)))).
- ``sfnet20``: stage opener named ``conv1``; block output = relu(x + conv2(relu(conv1(x)))).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["SFNet", "sfnet20", "sfnet20_deprecated"]


class _Opener(nn.Module):
    def __init__(self, cin: int, cout: int, name: str):
        super().__init__()
        self.name = name
        setattr(self, name, nn.Conv2d(cin, cout, 3, 2, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, self.name)(x))


class _Block(nn.Module):
    def __init__(self, planes: int, relu_after_add: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.relu_after_add = relu_after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_after_add:
            return F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return x + F.relu(self.conv2(F.relu(self.conv1(x))))


class SFNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (1, 2, 4, 1), num_features: int = 512, deprecated: bool = False):
        super().__init__()
        opener = "conv" if deprecated else "conv1"
        widths = (64, 128, 256, 512)
        cin = 3
        for i, (width, n) in enumerate(zip(widths, blocks), start=1):
            stage = nn.Sequential(_Opener(cin, width, opener),
                                  *[_Block(width, relu_after_add=not deprecated) for _ in range(n)])
            setattr(self, f"layer{i}", stage)
            cin = width
        self.fc = nn.Linear(512 * 7 * 7, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(x, 1))


def sfnet20(num_features: int = 512, **_: object) -> SFNet:
    return SFNet(num_features=num_features, deprecated=False)


def sfnet20_deprecated(num_features: int = 512, **_: object) -> SFNet:
    return SFNet(num_features=num_features, deprecated=True)
