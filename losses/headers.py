"""Identity headers: normalised-softmax classifiers with angular (ArcFace, ElasticArcFace) or cosine margins, each a
class registered by name (config option ``loss``)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from config.options import register_options
from utils.registry import Registry

__all__ = ["ArcFace", "CosFace", "ElasticArcFace", "ElasticCosFace", "HEADERS", "register_header", "get_header"]

# config option ``loss``: every identity header, by name (the ElasticFace-Arc/-Cos spellings are ElasticFace's own)
HEADERS: Registry[type["Header"]] = Registry("identity header", "loss", on_options=register_options)
register_header = HEADERS.register


class Header(nn.Module):
    """Holds ``kernel`` (embedding_size, n_identities), initialised N(0, 0.01), as the authors' header. A subclass
    defines ``forward`` and, for per-sample margins, ``margins`` (then ``random_margin = True``)."""
    random_margin: ClassVar[bool] = False   # True: margins() draws from the generator, even at m = 0

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.0):
        super().__init__()
        self.s, self.m = float(s), float(m)
        self.kernel = nn.Parameter(torch.empty(in_features, out_features))
        nn.init.normal_(self.kernel, std=0.01)

    @classmethod
    def from_settings(cls, embedding_size: int, n_identities: int, s: float, m: float, sigma: float) -> "Header":
        """The header of config options embedding_size, s, m and sigma (a header without per-sample margins has no
        use for sigma)."""
        return cls(embedding_size, n_identities, s, m)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (F.normalize(embeddings, dim=1) @ F.normalize(self.kernel, dim=0)).clamp(-1.0, 1.0)

    def margins(self, labels: torch.Tensor, generator: torch.Generator | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full(labels.shape, self.m, device=labels.device, dtype=dtype)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@register_header("ArcFace", help="additive angular margin: s * cos(theta + m) on the target class (m = 0: the paper's)")
class ArcFace(Header):
    """logits = s * cos(theta + m on the target class). With a fixed m = 0 this is s * cos(theta), computed
    directly (same values; avoids acos's infinite gradient at cos = +-1)."""

    def forward(self, embeddings, labels, generator=None):
        cos = self.cosine(embeddings)
        margin = self.margins(labels, generator, cos.dtype)
        if self.m == 0.0 and not self.random_margin:
            return self.s * cos
        theta = torch.acos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.s * torch.cos(theta + onehot * margin[:, None])


@register_header("CosFace", help="additive cosine margin: s * (cos(theta) - m) on the target class")
class CosFace(Header):
    """logits = s * (cos(theta) - m on the target class)."""

    def forward(self, embeddings, labels, generator=None):
        cos = self.cosine(embeddings)
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.s * (cos - onehot * self.margins(labels, generator, cos.dtype)[:, None])


class _Elastic:
    """ElasticFace's per-sample margin, mixed into a margin header."""
    random_margin: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.5, sigma: float = 0.05):
        super().__init__(in_features, out_features, s, m)  # type: ignore[call-arg]
        self.sigma = float(sigma)

    @classmethod
    def from_settings(cls, embedding_size: int, n_identities: int, s: float, m: float, sigma: float) -> "Header":
        return cls(embedding_size, n_identities, s, m, sigma)  # type: ignore[return-value]   # mixed into a Header

    def margins(self, labels, generator, dtype=torch.float32):
        """Per-sample margin drawn from N(m, sigma) (ElasticFace), on the generator's device (a CUDA generator: no
        copy to the GPU; no generator: the global CPU one)."""
        device = generator.device if generator is not None else "cpu"
        noise = torch.randn(labels.shape, generator=generator, device=device).to(labels.device, dtype)
        return self.m + self.sigma * noise


@register_header("ElasticFace-Arc", help="ElasticFace's name of ElasticArcFace")
@register_header("ElasticArcFace", help="ArcFace with a per-sample margin drawn from N(m, sigma) (ElasticFace)")
class ElasticArcFace(_Elastic, ArcFace):
    pass


@register_header("ElasticFace-Cos", help="ElasticFace's name of ElasticCosFace")
@register_header("ElasticCosFace", help="CosFace with a per-sample margin drawn from N(m, sigma) (ElasticFace)")
class ElasticCosFace(_Elastic, CosFace):
    pass


def get_header(name: str, embedding_size: int, n_identities: int, s: float, m: float, sigma: float) -> Header:
    """The header named by config.loss (a UserError with the closest name for an unknown one)."""
    return HEADERS.get(name).from_settings(embedding_size, n_identities, s, m, sigma)
