"""Identity headers: normalised-softmax classifiers with angular (ArcFace, ElasticArcFace) or cosine margins."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["ArcFace", "CosFace", "ElasticArcFace", "ElasticCosFace", "HEADERS", "get_header"]

# config.loss names; the ElasticFace-Arc/-Cos spellings are ElasticFace's own
HEADERS = ("ArcFace", "CosFace", "ElasticArcFace", "ElasticCosFace", "ElasticFace-Arc", "ElasticFace-Cos")


class _Header(nn.Module):
    """Holds ``kernel`` (embedding_size, n_identities), initialised N(0, 0.01), as the authors' header."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.0):
        super().__init__()
        self.s, self.m = float(s), float(m)
        self.kernel = nn.Parameter(torch.empty(in_features, out_features))
        nn.init.normal_(self.kernel, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (F.normalize(embeddings, dim=1) @ F.normalize(self.kernel, dim=0)).clamp(-1.0, 1.0)

    def margins(self, labels: torch.Tensor, generator: torch.Generator | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full(labels.shape, self.m, device=labels.device, dtype=dtype)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class ArcFace(_Header):
    """logits = s * cos(theta + m on the target class). With m = 0 this is s * cos(theta), computed directly
    (same values; avoids acos's infinite gradient at cos = +-1)."""

    def forward(self, embeddings, labels, generator=None):
        cos = self.cosine(embeddings)
        margin = self.margins(labels, generator, cos.dtype)
        if self.m == 0.0 and not isinstance(self, ElasticArcFace):
            return self.s * cos
        theta = torch.acos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.s * torch.cos(theta + onehot * margin[:, None])


class CosFace(_Header):
    """logits = s * (cos(theta) - m on the target class)."""

    def forward(self, embeddings, labels, generator=None):
        cos = self.cosine(embeddings)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.s * (cos - onehot * self.margins(labels, generator, cos.dtype)[:, None])


class _Elastic:
    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.5, sigma: float = 0.05):
        super().__init__(in_features, out_features, s, m)  # type: ignore[call-arg]
        self.sigma = float(sigma)

    def margins(self, labels, generator, dtype=torch.float32):
        """Per-sample margin drawn from N(m, sigma) (ElasticFace), on the generator's device (a CUDA generator: no
        copy to the GPU; no generator: the global CPU one)."""
        device = generator.device if generator is not None else "cpu"
        noise = torch.randn(labels.shape, generator=generator, device=device).to(labels.device, dtype)
        return self.m + self.sigma * noise


class ElasticArcFace(_Elastic, ArcFace):
    pass


class ElasticCosFace(_Elastic, CosFace):
    pass


def get_header(name: str, embedding_size: int, n_identities: int, s: float, m: float, sigma: float) -> _Header:
    """The header named by config.loss."""
    if name == "ArcFace":
        return ArcFace(embedding_size, n_identities, s, m)
    if name == "CosFace":
        return CosFace(embedding_size, n_identities, s, m)
    name = {"ElasticFace-Arc": "ElasticArcFace", "ElasticFace-Cos": "ElasticCosFace"}.get(name, name)
    if name == "ElasticArcFace":
        return ElasticArcFace(embedding_size, n_identities, s, m, sigma)
    if name == "ElasticCosFace":
        return ElasticCosFace(embedding_size, n_identities, s, m, sigma)
    raise ValueError(f"unknown loss {name}")
