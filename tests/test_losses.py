import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses.privacy import COS_EPS
from losses import ArcFace, CosFace, ElasticArcFace, gender_weight_centroids, get_header, privacy_terms


def unit(*v):
    t = torch.tensor(v, dtype=torch.float64)
    return t / t.norm()


def test_p1_hand_worked_angle():
    # gender-0 centroid along x, gender-1 centroid at 60 degrees in the xy plane
    z = torch.stack([unit(1, 0.2, 0), unit(1, -0.2, 0), unit(0.5, math.sqrt(3) / 2, 0.3),
                     unit(0.5, math.sqrt(3) / 2, -0.3)])
    g = torch.tensor([0, 0, 1, 1])
    kernel = torch.eye(3, dtype=torch.float64)
    t = privacy_terms(z, g, kernel, torch.tensor([0, 1, 1]))
    assert math.degrees(t.p1.item()) == pytest.approx(60.0, abs=1e-4)
    assert not t.single_gender


def test_p2_hand_worked_angle():
    # identities 0 (gender 0) -> column x, 1 and 2 (gender 1) -> columns y and z: w_1 = (0,1,1)/sqrt2
    kernel = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 0.5]], dtype=torch.float64)
    z = torch.stack([unit(1, 0, 0), unit(0, 1, 0)])
    g = torch.tensor([0, 1])
    t = privacy_terms(z, g, kernel, torch.tensor([0, 1, 1]))
    # gender-0 sample vs w_1: 90 deg; gender-1 sample (y) vs w_0 = x: 90 deg
    assert t.p2.item() == pytest.approx(math.pi, abs=1e-6)
    z2 = torch.stack([unit(0, 1, 1), unit(1, 0, 0)])
    t2 = privacy_terms(z2, g, kernel, torch.tensor([0, 1, 1]))
    # (0,1,1) lies on w_1 and x on w_0: both angles are 0, up to the clamp of the cosine at 1 - COS_EPS
    assert t2.p2.item() == pytest.approx(2 * math.acos(1 - COS_EPS), abs=1e-9)
    t3 = privacy_terms(torch.stack([unit(0, 1, 0), unit(0, 1, 0)]), g, kernel, torch.tensor([0, 1, 1]))
    assert t3.p2.item() == pytest.approx(math.radians(45) + math.radians(90), abs=1e-6)


def numpy_terms(z, g, kernel, idg):
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    c = [z[g == k].mean(0) for k in (0, 1)]
    c = [v / np.linalg.norm(v) for v in c]
    p1 = np.arccos(np.clip(c[0] @ c[1], -1, 1))
    cols = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    w = [cols[:, idg == k].mean(1) for k in (0, 1)]
    w = [v / np.linalg.norm(v) for v in w]
    p2 = np.arccos(z[g == 0] @ w[1]).mean() + np.arccos(z[g == 1] @ w[0]).mean()
    return p1, p2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_privacy_terms_match_float64_numpy(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(64, 32))
    g = rng.integers(0, 2, 64)
    kernel = rng.normal(size=(32, 10))
    idg = np.array([0, 1] * 5)
    t = privacy_terms(torch.tensor(z), torch.tensor(g), torch.tensor(kernel), torch.tensor(idg))
    p1, p2 = numpy_terms(z, g, kernel, idg)
    assert t.p1.item() == pytest.approx(p1, abs=1e-9)
    assert t.p2.item() == pytest.approx(p2, abs=1e-9)
    # symmetric in the two genders: swapping labels everywhere changes nothing
    s = privacy_terms(torch.tensor(z), torch.tensor(1 - g), torch.tensor(kernel), torch.tensor(1 - idg))
    assert s.p1.item() == pytest.approx(t.p1.item(), abs=1e-12)
    assert s.p2.item() == pytest.approx(t.p2.item(), abs=1e-12)


def test_gradient_step_on_p1_shrinks_the_centroid_angle():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    x[:16, 0] += 3.0
    g = torch.tensor([0] * 16 + [1] * 16)
    layer = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    kernel = torch.randn(16, 4)
    before = privacy_terms(layer(x), g, kernel, torch.tensor([0, 1, 0, 1])).p1
    before.backward()
    opt.step()
    after = privacy_terms(layer(x), g, kernel, torch.tensor([0, 1, 0, 1])).p1
    assert after.item() < before.item()


def test_single_gender_batch_is_finite_and_flagged():
    z = torch.randn(8, 16, requires_grad=True)
    t = privacy_terms(z, torch.zeros(8, dtype=torch.long), torch.randn(16, 4), torch.tensor([0, 1, 0, 1]))
    assert t.single_gender and t.p1.item() == 0.0 and math.isfinite(t.p2.item())
    (t.p1 + t.p2).backward()
    assert torch.isfinite(z.grad).all()


def test_identical_centroids_give_finite_gradients():
    z = torch.ones(4, 8, requires_grad=True)
    t = privacy_terms(z, torch.tensor([0, 0, 1, 1]), torch.randn(8, 2), torch.tensor([0, 1]))
    t.p1.backward()
    assert torch.isfinite(z.grad).all()


def independent_logits(emb, kernel, labels, s, m, cos_margin=False):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    k = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(e @ k, -1, 1)
    out = cos.copy()
    for i, y in enumerate(labels):
        out[i, y] = cos[i, y] - m if cos_margin else np.cos(np.arccos(cos[i, y]) + m)
    return s * out


@pytest.mark.parametrize("m", [0.0, 0.3])
def test_arcface_logits(m):
    torch.manual_seed(0)
    h = ArcFace(16, 7, s=64.0, m=m).double()
    assert h.kernel.shape == (16, 7)
    assert h.kernel.std().item() == pytest.approx(0.01, rel=0.3)
    emb = torch.randn(5, 16, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, 2, 2])
    got = h(emb, y).detach().numpy()
    want = independent_logits(emb.numpy(), h.kernel.detach().numpy(), y.numpy(), 64.0, m)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cosface_and_elastic_headers():
    torch.manual_seed(0)
    emb = torch.randn(4, 8, dtype=torch.float64)
    y = torch.tensor([1, 0, 2, 1])
    h = CosFace(8, 3, s=30.0, m=0.35).double()
    want = independent_logits(emb.numpy(), h.kernel.detach().numpy(), y.numpy(), 30.0, 0.35, cos_margin=True)
    np.testing.assert_allclose(h(emb, y).detach().numpy(), want, atol=1e-9)
    e = ElasticArcFace(8, 3, s=64.0, m=0.5, sigma=0.05)
    margins = e.margins(torch.zeros(20000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert margins.mean().item() == pytest.approx(0.5, abs=0.002)
    assert margins.std().item() == pytest.approx(0.05, rel=0.05)



def test_elastic_cosface_subtracts_a_per_sample_margin_drawn_from_its_generator():
    torch.manual_seed(0)
    head = get_header("ElasticCosFace", 8, 5, 64.0, 0.35, 0.05)
    z = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = head(z, labels, torch.Generator().manual_seed(7))
    margins = 0.35 + 0.05 * torch.randn(6, generator=torch.Generator().manual_seed(7))   # N(m, sigma) per sample
    cos = F.normalize(z, dim=1) @ F.normalize(head.kernel, dim=0)
    expected = 64.0 * (cos - F.one_hot(labels, 5) * margins[:, None])
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, 64.0 * (cos - F.one_hot(labels, 5) * 0.35))   # the margin really varies


def test_weight_centroids_are_normalised_means_of_normalised_columns():
    kernel = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    w = gender_weight_centroids(kernel, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(w[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    torch.testing.assert_close(w[1], F.normalize(torch.tensor([1.0, 1.0]), dim=0))


def test_a_registered_header_with_per_sample_margins_gets_them_at_m_0():
    """The angular path is chosen by the header's declared ``random_margin``, not by its class: a plug-in header
    drawing its own margins keeps them at m = 0 (the logits of the drawn margin, 0.2 here)."""
    from helpers import registered
    from losses import HEADERS, register_header

    class Jitter(ArcFace):
        random_margin = True

        def margins(self, labels, generator, dtype=torch.float32):
            return torch.full(labels.shape, 0.2, dtype=dtype)
    with registered():
        register_header("Jitter_test", help="a fixed 'drawn' margin")(Jitter)
        torch.manual_seed(0)
        h = get_header("Jitter_test", 16, 7, 64.0, 0.0, 0.0).double()
    assert "Jitter_test" not in HEADERS
    emb, y = torch.randn(5, 16, dtype=torch.float64), torch.tensor([0, 3, 6, 2, 2])
    want = independent_logits(emb.numpy(), h.kernel.detach().numpy(), y.numpy(), 64.0, 0.2)
    np.testing.assert_allclose(h(emb, y).detach().numpy(), want, atol=1e-5)
