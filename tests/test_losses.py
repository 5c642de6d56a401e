"""Tests for losses.py: known values, cross-checks against direct formulas and torch.distributions, finiteness."""

import math

import pytest
import torch
import torch.nn.functional as F

import losses


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- Mixture likelihood

def direct_mixture_nll(x, means, masks, sigmas):
    """Per pixel: -log sum_k m_k prod_c N(x_c; mu_kc, sigma_k^2), with plain exp (fine for small errors)."""
    B, K, C, H, W = means.shape
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                p = 0.0
                for k in range(K):
                    dens = 1.0
                    for c in range(C):
                        s = sigmas[k]
                        dens *= math.exp(-(x[b, c, i, j] - means[b, k, c, i, j]) ** 2 / (2 * s * s)) \
                            / (s * math.sqrt(2 * math.pi))
                    p += masks[b, k, i, j].item() * dens
                out[b] -= math.log(p)
    return out


def test_mixture_nll_equals_direct_formula():
    x = rand(2, 3, 4, 5, seed=1).mul(0.3)
    means = rand(2, 4, 3, 4, 5, seed=2).mul(0.3)
    log_masks = F.log_softmax(rand(2, 4, 4, 5, seed=3), dim=1)
    sig = torch.tensor([0.09, 0.11, 0.11, 0.11], dtype=torch.float64)
    got = losses.mixture_nll(x, means, log_masks, sig)
    assert got.shape == (2,)
    assert torch.allclose(got, direct_mixture_nll(x, means, log_masks.exp(), sig.tolist()), rtol=1e-10)
    # A float sigma is the same as a constant per-slot sigma.
    assert torch.allclose(losses.mixture_nll(x, means, log_masks, 0.1),
                          losses.mixture_nll(x, means, log_masks, torch.full((4,), 0.1, dtype=torch.float64)))


def test_gaussian_log_likelihood_matches_torch_normal():
    x, means = rand(2, 3, 4, 4, seed=4), rand(2, 5, 3, 4, 4, seed=5)
    sig = torch.linspace(0.1, 0.5, 5, dtype=torch.float64)
    got = losses.gaussian_log_likelihood(x, means, sig)
    ref = torch.distributions.Normal(means, sig.view(1, 5, 1, 1, 1)).log_prob(x[:, None]).sum(2)
    assert got.shape == (2, 5, 4, 4) and torch.allclose(got, ref)


def test_mixture_nll_stable_with_zero_masks_and_far_pixels():
    x = torch.zeros(1, 3, 2, 2, requires_grad=True)
    means = torch.full((1, 2, 3, 2, 2), 5.0, requires_grad=True)  # 45 sigma away: exp underflows, logsumexp not
    log_masks = torch.log(torch.tensor([1.0, 0.0])).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone().requires_grad_()
    nll = losses.mixture_nll(x, means, log_masks, 0.11)
    nll.sum().backward()
    assert torch.isfinite(nll).all()
    for t in (x, means, log_masks):
        assert torch.isfinite(t.grad).all()


# --- IR loss

def test_ir_loss_equals_mixture_nll_for_one_hot_masks_with_unequal_sigmas():
    x = rand(3, 3, 4, 4, seed=6).mul(0.2)
    means = rand(3, 5, 3, 4, 4, seed=7).mul(0.2)
    sigma = torch.tensor([0.09, 0.11, 0.2, 0.05, 0.11], dtype=torch.float64)  # unequal: the normaliser matters
    hard = F.one_hot(rand(3, 4, 4, seed=9).abs().mul(10).long() % 5, 5).permute(0, 3, 1, 2).double()
    got = losses.ir_loss(x, means, torch.log(hard), sigma)
    torch.testing.assert_close(got, direct_mixture_nll(x, means, hard, sigma.tolist()), rtol=1e-10, atol=1e-9)


def test_ir_loss_is_above_mixture_nll_for_soft_masks():
    x = rand(3, 3, 4, 4, seed=6).mul(0.2)
    means = rand(3, 5, 3, 4, 4, seed=7).mul(0.2)
    sigma = torch.tensor([0.09, 0.11, 0.11, 0.11, 0.11], dtype=torch.float64)
    log_soft = F.log_softmax(rand(3, 5, 4, 4, seed=8), dim=1)
    nll = direct_mixture_nll(x, means, log_soft.exp(), sigma.tolist())
    assert (losses.ir_loss(x, means, log_soft, sigma) > nll + 1e-3).all()  # Jensen, strict for soft masks


def test_ir_loss_normaliser_depends_on_which_slot_holds_the_pixel():
    """Perfect reconstructions: one-hot on the background slot (sigma 0.09) against a foreground slot (0.11) differ by
    C * log(0.11 / 0.09) per pixel, as the mixture NLL does (about 0.6 nats for RGB)."""
    x = rand(1, 3, 2, 2, seed=1)
    means = x[:, None].expand(1, 2, 3, 2, 2)
    sigma = torch.tensor([0.09, 0.11], dtype=torch.float64)
    on = lambda k: torch.log(F.one_hot(torch.full((1, 2, 2), k), 2).permute(0, 3, 1, 2).double())
    gap = losses.ir_loss(x, means, on(1), sigma) - losses.ir_loss(x, means, on(0), sigma)
    assert gap.item() == pytest.approx(4 * 3 * math.log(0.11 / 0.09))


def test_ir_loss_per_slot_sigma_known_value():
    x = torch.zeros(1, 1, 1, 2)
    means = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1, 1).expand(1, 2, 1, 1, 2)
    log_masks = torch.log(torch.tensor([[0.25, 0.75], [1.0, 0.0]]).T).view(1, 2, 1, 2)  # pixel 0: .25/.75
    got = losses.ir_loss(x, means, log_masks, torch.tensor([0.5, 1.0]))
    # -log N(0; mu, s^2) = mu^2 / (2 s^2) + log s + log(2 pi) / 2; pixel 0 mixes both slots, pixel 1 is slot 0's
    slot0, slot1 = 1 / (2 * 0.25) + math.log(0.5), 4 / 2 + math.log(1.0)
    expected = 0.25 * slot0 + 0.75 * slot1 + slot0 + 2 * 0.5 * math.log(2 * math.pi)
    assert got.item() == pytest.approx(expected)
    assert losses.ir_loss(x, means, log_masks, 0.7).item() == pytest.approx(
        losses.ir_loss(x, means, log_masks, torch.tensor([0.7, 0.7])).item())


# --- KL terms

def test_kl_diag_gaussian_matches_torch_distributions():
    mu, logvar = rand(4, 16, seed=10), rand(4, 16, seed=11)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    got = losses.kl_diag_gaussian(mu, logvar)
    assert torch.allclose(got, torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)))
    pm, plv = rand(4, 16, seed=12), rand(4, 16, seed=13)
    got = losses.kl_diag_gaussian(mu, logvar, pm, plv)
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(pm, (0.5 * plv).exp()))
    assert torch.allclose(got, ref)
    assert torch.allclose(losses.kl_diag_gaussian(mu, logvar, mu, logvar), torch.zeros_like(mu))


def test_mask_kl_zero_when_equal_and_matches_formula():
    logits = rand(2, 4, 3, 3, seed=14)
    log_m = F.log_softmax(logits, dim=1)
    assert torch.allclose(losses.mask_kl(log_m, logits), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    other = rand(2, 4, 3, 3, seed=15)
    ref = (log_m.exp() * (log_m - F.log_softmax(other, 1))).sum((1, 2, 3))
    got = losses.mask_kl(log_m, other)
    assert got.shape == (2,) and torch.allclose(got, ref) and (got > 0).all()


def test_mask_kl_finite_with_exact_zero_masks():
    m = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    log_m = torch.log(m).clone().requires_grad_()  # contains -inf
    logits = rand(1, 3, 2, 2, seed=16).float().requires_grad_()
    kl = losses.mask_kl(log_m, logits)
    kl.sum().backward()
    assert torch.allclose(kl, -F.log_softmax(logits, 1)[:, 0].sum().view(1))  # only slot 0 contributes
    assert torch.isfinite(log_m.grad).all() and torch.isfinite(logits.grad).all()


# --- Covariance / variance / cosine

def test_covariance_loss_zero_for_decorrelated_features():
    # QR of [1, noise]: the other columns are orthogonal to the constant (centred) and to each other, so the
    # covariance is diagonal; scaling the columns keeps it diagonal.
    q2, _ = torch.linalg.qr(torch.cat([torch.ones(64, 1, dtype=torch.float64), rand(64, 8, seed=18)], 1))
    z = q2[:, 1:] * torch.arange(1, 9, dtype=torch.float64)  # orthogonal to the constant: already centred
    assert losses.covariance_loss(z).item() == pytest.approx(0.0, abs=1e-20)


def test_covariance_loss_hand_value_2d():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]])
    # centred: [[-1,-1],[0,1],[1,0]]; cov_xy = (1 + 0 + 0) / 2 = 0.5; off-diagonal squares 2 * 0.25 = 0.5
    assert losses.covariance_loss(z, "dim").item() == pytest.approx(0.5 / 2)
    assert losses.covariance_loss(z, "dim2").item() == pytest.approx(0.5 / 4)
    with pytest.raises(ValueError):
        losses.covariance_loss(z, "batch")


def test_variance_loss_values():
    z = rand(256, 6, seed=19) * 3.0  # std ~3 >= gamma
    assert losses.variance_loss(z, gamma=1.0).item() == 0.0
    const = torch.zeros(10, 4)
    assert losses.variance_loss(const, gamma=1.0).item() == pytest.approx(1 - math.sqrt(1e-4))
    z = torch.tensor([[0.0], [1.0]])  # var 0.5
    assert losses.variance_loss(z, gamma=2.0, eps=0.0).item() == pytest.approx(2 - math.sqrt(0.5))


def test_cosine_slot_loss_values():
    eye = torch.eye(4).expand(3, 4, 4)  # orthogonal slots
    assert losses.cosine_slot_loss(eye).item() == 0.0
    same = torch.ones(2, 5, 8)  # 20 of the 25 ordered pairs at cos 1: 0.8 * 20 / 25
    assert losses.cosine_slot_loss(same, margin=0.2).item() == pytest.approx(0.8 * 20 / 25)
    assert losses.cosine_slot_loss(torch.randn(2, 1, 8)).item() == 0.0
    # Mixed batch: image 0 identical slots (0.8 * 6 / 9), image 1 orthogonal (0)
    mixed = torch.stack([torch.ones(3, 3), torch.eye(3)])
    assert losses.cosine_slot_loss(mixed).item() == pytest.approx(0.8 * 6 / 9 / 2)


def test_cosine_slot_loss_equals_the_authors_cosine_embedding_loss():
    # robert1003 be8d9c8: every ordered pair (i, j) of an image's K slots, target +1 where i == j and -1 elsewhere,
    # torch's cosine_embedding_loss with margin 0.2, averaged over all B*K^2 pairs.
    torch.manual_seed(0)
    slots = torch.randn(3, 5, 8) + 0.8  # shifted: many pairs above the margin
    b, k, d = slots.shape
    first = slots[:, :, None].expand(b, k, k, d).reshape(-1, d)
    second = slots[:, None, :].expand(b, k, k, d).reshape(-1, d)
    target = torch.where(torch.eye(k, dtype=torch.bool), 1.0, -1.0).repeat(b, 1, 1).reshape(-1)
    want = F.cosine_embedding_loss(first, second, target, margin=0.2)
    torch.testing.assert_close(losses.cosine_slot_loss(slots, margin=0.2), want, atol=1e-6, rtol=1e-5)


# --- Entropies

def test_pixel_and_object_entropy_known_values():
    K = 5
    one_hot = F.one_hot(torch.randint(0, K, (2, 6, 6)), K).permute(0, 3, 1, 2).float()
    assert losses.pixel_entropy(one_hot).item() == 0.0
    uniform = torch.full((2, K, 6, 6), 1 / K)
    assert losses.pixel_entropy(uniform).item() == pytest.approx(math.log(K))
    assert losses.pixel_entropy(uniform.flatten(2)).item() == pytest.approx(math.log(K))  # (B, K, N)
    balanced = F.one_hot(torch.arange(10) % K, K).T.reshape(1, K, 2, 5).float()  # each slot owns 2 of 10 pixels
    assert losses.object_entropy(balanced).item() == pytest.approx(math.log(K))
    assert losses.object_entropy(torch.zeros(1, K, 3, 3).index_fill(1, torch.tensor([2]), 1.0)).item() == 0.0


@pytest.mark.parametrize("fn", [losses.pixel_entropy, losses.object_entropy])
def test_entropies_finite_gradients_at_exact_zero_and_one(fn):
    m = F.one_hot(torch.tensor([[0, 1], [1, 1]]), 3).permute(2, 0, 1)[None].float().requires_grad_()
    value = fn(m)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(m.grad).all()
    logits = torch.tensor([[-1e4], [0.0], [1e4]]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone().requires_grad_()
    value = fn(torch.softmax(logits, dim=1))  # saturated softmax: exact 0 and 1
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_all_losses_have_finite_gradients():
    x = rand(2, 3, 4, 4, seed=20).requires_grad_()
    means = rand(2, 3, 3, 4, 4, seed=21).requires_grad_()
    logits = rand(2, 3, 4, 4, seed=22).requires_grad_()
    slots = rand(2, 3, 6, seed=23).requires_grad_()
    log_m = F.log_softmax(logits, 1)
    total = (losses.mixture_nll(x, means, log_m, torch.tensor([0.09, 0.11, 0.11])).sum()
             + losses.ir_loss(x, means, log_m, 0.1).sum() + losses.mask_kl(log_m, -logits).sum()
             + losses.kl_diag_gaussian(slots, slots).sum() + losses.covariance_loss(slots.flatten(0, 1))
             + losses.variance_loss(slots.flatten(0, 1)) + losses.cosine_slot_loss(slots, margin=-1.0)
             + losses.pixel_entropy(log_m.exp()) + losses.object_entropy(log_m.exp()))
    total.backward()
    for t in (x, means, logits, slots):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# --- SimSiam, Sinkhorn-Knopp, SwAV

def test_simsiam_loss_is_minus_one_for_identical_predictions_and_targets():
    z = rand(6, 8, seed=40)
    assert losses.simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0, abs=1e-12)
    assert losses.simsiam_loss(z, 3 * z, -z, -0.5 * z).item() == pytest.approx(-1.0, abs=1e-12)  # scale-free
    assert losses.simsiam_loss(z, -z, z, -z).item() == pytest.approx(1.0, abs=1e-12)


def test_simsiam_loss_value_and_stop_gradient():
    p1, z2, p2, z1 = (rand(2, 5, 8, seed=s).requires_grad_() for s in (41, 42, 43, 44))
    loss = losses.simsiam_loss(p1, z2, p2, z1)

    def cos(a, b):  # the paper's D(p, z) = -p/||p|| . z/||z||, written out
        return (a * b).sum(-1) / (a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt())

    want = -cos(p1, z2).mean() / 2 - cos(p2, z1).mean() / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # the targets are stop-gradient
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def sinkhorn_transcribed(scores, eps, iters):
    """SwAV's loop (arXiv 2006.09882 Sec. 3.1 / main_swav.py), float64, written independently: Q = exp(S / eps)^T,
    normalised; rows (prototypes) to 1/P, columns (samples) to 1/N, repeated; codes = N Q^T."""
    q = torch.exp(scores.double() / eps).T
    q /= q.sum()
    p, n = q.shape
    for _ in range(iters):
        for j in range(p):
            q[j] /= q[j].sum() * p
        for i in range(n):
            q[:, i] /= q[:, i].sum() * n
    return (n * q).T


def test_sinkhorn_equals_the_reference_loop_and_has_uniform_column_marginals():
    scores = F.normalize(rand(12, 16, seed=45), dim=1) @ F.normalize(rand(5, 16, seed=46), dim=1).T  # cosines
    codes = losses.sinkhorn(scores, epsilon=0.05, iters=3)
    assert codes.shape == (12, 5) and (codes >= 0).all()
    assert torch.allclose(codes, sinkhorn_transcribed(scores, 0.05, 3), rtol=1e-9, atol=1e-12)
    q = codes.T / 12  # SwAV's Q (P, N): every column (sample) carries 1/N exactly
    assert torch.allclose(q.sum(dim=0), torch.full((12,), 1 / 12, dtype=torch.float64), atol=1e-12)
    # the rows (prototypes) reach 1/P as the iterations go on: equal partition
    q = losses.sinkhorn(scores, epsilon=0.05, iters=500).T / 12
    assert torch.allclose(q.sum(dim=1), torch.full((5,), 1 / 5, dtype=torch.float64), atol=1e-6)
    # large scores / epsilon: exp would overflow in float32 without the shift
    big = losses.sinkhorn(scores.float() * 10, epsilon=0.05, iters=3)
    assert torch.isfinite(big).all() and torch.allclose(big.sum(dim=1), torch.ones(12), atol=1e-5)


def test_swav_loss_is_the_swapped_cross_entropy():
    s1, s2 = (F.normalize(rand(10, 6, seed=s), dim=1).requires_grad_() for s in (47, 48))
    loss = losses.swav_loss(s1, s2, temperature=0.1, epsilon=0.05, iters=3)
    q1, q2 = sinkhorn_transcribed(s1.detach(), 0.05, 3), sinkhorn_transcribed(s2.detach(), 0.05, 3)
    logp1 = s1 / 0.1 - torch.logsumexp(s1 / 0.1, dim=1, keepdim=True)
    logp2 = s2 / 0.1 - torch.logsumexp(s2 / 0.1, dim=1, keepdim=True)
    want = -((q2 * logp1).sum(1).mean() + (q1 * logp2).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    loss.backward()  # the codes are targets: the gradient is the softmax's only, p - q
    grad1 = (torch.softmax(s1.detach() / 0.1, dim=1) - q2) / 0.1 / 10 / 2
    assert torch.allclose(s1.grad, grad1, atol=1e-9)
