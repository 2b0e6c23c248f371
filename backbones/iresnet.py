"""insightface's IResNet (arcface_torch), with ElasticFace's optional SE blocks.

State-dict keys and shapes equal those of the public checkpoints (insightface model zoo, ElasticFace), so
their ``backbone.pth`` files load unchanged. Input: 112x112 RGB normalised as (x/255 - 0.5)/0.5.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.architectures import register_architecture

__all__ = ["IResNet", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate as ElasticFace's ``se_block``: two bias-free 1x1 convs, so its files load."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class IBasicBlock(nn.Module):
    """BN -> conv -> BN -> PReLU -> conv(stride) -> BN (+ SE), plus the (downsampled) input."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 use_se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.use_se = use_se
        if use_se:
            self.se_block = SEModule(planes, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.use_se:
            out = self.se_block(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    fc_scale = 7 * 7

    def __init__(self, layers: list[int], dropout: float = 0.0, num_features: int = 512, use_se: bool = False):
        super().__init__()
        self.inplanes = 64
        self.use_se = use_se
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, 0, 0.1)
            elif isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(mod.weight, 1)
                nn.init.constant_(mod.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample, use_se=self.use_se)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes, use_se=self.use_se) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _iresnet(layers: list[int], num_features: int = 512, use_se: bool = False, dropout: float = 0.0,
             **_: object) -> IResNet:
    """Mixed precision is the extraction's choice (config amp), not the architecture's."""
    return IResNet(layers, dropout=dropout, num_features=num_features, use_se=use_se)


@register_architecture("iresnet18", help="IResNet-18 (arcface_torch)")
def iresnet18(num_features: int = 512, use_se: bool = False, dropout: float = 0.0, **kw) -> IResNet:
    return _iresnet([2, 2, 2, 2], num_features, use_se, dropout, **kw)


@register_architecture("iresnet34", help="IResNet-34 (arcface_torch)")
def iresnet34(num_features: int = 512, use_se: bool = False, dropout: float = 0.0, **kw) -> IResNet:
    return _iresnet([3, 4, 6, 3], num_features, use_se, dropout, **kw)


@register_architecture("iresnet50", help="IResNet-50 (arcface_torch)")
def iresnet50(num_features: int = 512, use_se: bool = False, dropout: float = 0.0, **kw) -> IResNet:
    return _iresnet([3, 4, 14, 3], num_features, use_se, dropout, **kw)


@register_architecture("iresnet100", help="IResNet-100 (arcface_torch)")
def iresnet100(num_features: int = 512, use_se: bool = False, dropout: float = 0.0, **kw) -> IResNet:
    return _iresnet([3, 13, 30, 3], num_features, use_se, dropout, **kw)


@register_architecture("iresnet200", help="IResNet-200 (arcface_torch)")
def iresnet200(num_features: int = 512, use_se: bool = False, dropout: float = 0.0, **kw) -> IResNet:
    return _iresnet([6, 26, 60, 6], num_features, use_se, dropout, **kw)
