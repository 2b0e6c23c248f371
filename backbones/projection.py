"""The privacy layer and the finetuned model layer(normalize(backbone(x))) with a backbone that stays frozen."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ProjectionLayer", "FrozenBackbone", "FinetunedModel"]


class ProjectionLayer(nn.Module):
    """n_hidden linear layers joined by LeakyReLU(0.2); keys proj.0.*, proj.2.* for n_hidden=2 (authors' layout)."""

    def __init__(self, in_features: int = 512, out_features: int = 512, n_hidden: int = 2):
        super().__init__()
        if n_hidden < 1:
            raise ValueError("n_hidden must be at least 1")
        mods: list[nn.Module] = []
        for i in range(n_hidden):
            mods.append(nn.Linear(in_features if i == 0 else out_features, out_features))
            if i < n_hidden - 1:
                mods.append(nn.LeakyReLU(0.2))
        self.proj = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FrozenBackbone(nn.Module):
    """Wraps a pretrained backbone so it never trains: eval mode whatever ``.train()`` says, no gradients."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "FrozenBackbone":
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics and dropout stay as pretrained
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x)


class FinetunedModel(nn.Module):
    """layer(normalize(backbone(x))): the paper's finetuned model; its output is not normalised."""

    def __init__(self, backbone: nn.Module, layer: ProjectionLayer):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, FrozenBackbone) else FrozenBackbone(backbone)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(F.normalize(self.backbone(x)))
