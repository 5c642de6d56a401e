"""Reusable loss terms shared by the model files: plain functions, the equation and the paper in each docstring.

Shapes: images x (B, C, H, W); per-slot means (B, K, C, H, W); masks / log-masks (B, K, H, W) summing to 1 over K
(dim 1); slots (B, K, D). Which terms a model uses, and their weights, is written in the model file.
"""

import math

import torch
import torch.nn.functional as F


def _slot_sigma(sigma, like, ndim):
    """sigma as a float or a (K,) tensor -> a tensor broadcastable against (B, K, ...) with `ndim` dims."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.dim() == 0:
        return sigma
    return sigma.view(1, -1, *[1] * (ndim - 2))  # (1, K, 1, ...)


def gaussian_log_likelihood(x, means, sigma):
    """Per-slot, per-pixel Gaussian log-likelihood summed over channels (channels independent given the slot):

        log N(x; mu_k, sigma_k^2) = sum_c [ -(x_c - mu_kc)^2 / (2 sigma_k^2) - log sigma_k - log(2 pi) / 2 ]

    x (B, C, H, W), means (B, K, C, H, W), sigma a float or (K,) tensor (MONet: slot 0 sigma_bg, others sigma_fg).
    Returns (B, K, H, W). IODINE uses it on its own (leave-one-out likelihoods, mask posterior inputs).
    """
    s = _slot_sigma(sigma, means, means.dim())  # (1, K, 1, 1, 1) or scalar
    z = (x[:, None] - means) / s  # (B, K, C, H, W)
    log_n = -0.5 * z ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return log_n.sum(dim=2)  # (B, K, H, W)


def mixture_nll(x, means, log_masks, sigma):
    """Negative log-likelihood of the spatial Gaussian mixture (MONet, Burgess et al. 2019, arXiv 1901.11390, eq. 3;
    IODINE's decoder likelihood):

        -sum_pixels log sum_k m_k N(x; mu_k, sigma_k^2),  computed as -sum_pixels logsumexp_k(log m_k + log N_k).

    log_masks (B, K, H, W) are log mixing weights (log-softmax or MONet's log stick-breaking); returns (B,).
    """
    log_lik = gaussian_log_likelihood(x, means, sigma)  # (B, K, H, W)
    return -torch.logsumexp(log_masks + log_lik, dim=1).flatten(1).sum(dim=1)


def kl_diag_gaussian(mu, logvar, prior_mu=0.0, prior_logvar=0.0):
    """Elementwise KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) in closed form (the caller sums):

        KL = 1/2 [ prior_logvar - logvar + (e^logvar + (mu - prior_mu)^2) / e^prior_logvar - 1 ]

    (Kingma & Welling 2014, appendix B; the VAE term of MONet and IODINE.)
    """
    prior_mu = torch.as_tensor(prior_mu, dtype=mu.dtype, device=mu.device)
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) * torch.exp(-prior_logvar) - 1)


def mask_kl(log_attention, mask_logits):
    """MONet's mask reconstruction term (the gamma term, arXiv 1901.11390 eq. 3):

        KL(m || softmax_k(l)) = sum_k sum_pixels m_k (log m_k - log_softmax_k(l)),   with 0 log 0 = 0,

    where m = exp(log_attention) are the attention masks and l the decoders' mask logits, both (B, K, ...).
    Returns (B,). Exact zeros in m (log_attention = -inf) give a zero term and zero, finite gradients.
    """
    m = log_attention.exp()
    # Replace -inf by 0 before the product so that neither the value nor its gradient sees 0 * inf.
    log_m = torch.where(m > 0, log_attention, torch.zeros_like(log_attention))
    kl = m * (log_m - F.log_softmax(mask_logits, dim=1))
    return kl.flatten(1).sum(dim=1)


def ir_loss(x, means, log_masks, sigma):
    """Mask-weighted per-component negative log-likelihood, this project's form of the "IR" loss of the MONet loss
    ablation (arXiv 2310.03273; the paper's exact equation is not public, see PAPERS.md):

        sum_pixels sum_k m_k * (-log N(x; mu_k, sigma_k^2))
          = sum_pixels sum_k m_k [ ||x - mu_k||^2 / (2 sigma_k^2) + C (log sigma_k + log(2 pi) / 2) ]

    with C channels and the Gaussian normaliser kept: it depends on the masks whenever the sigma_k differ (MONet's
    sigma_bg != sigma_fg). Since -log is convex, Jensen's inequality makes it an upper bound of the mixture NLL
    -sum_pixels log sum_k m_k N(x; mu_k, sigma_k^2), equal to it for one-hot masks. It is linear in the masks, so its
    minimum over the masks is the one-hot mask on the component with the highest likelihood at each pixel (the
    winner-take-all mechanism). Returns (B,).
    """
    log_lik = gaussian_log_likelihood(x, means, sigma)  # (B, K, H, W)
    return -(log_masks.exp() * log_lik).flatten(1).sum(dim=1)


def covariance_loss(z, normalize="dim"):
    """Covariance penalty on projected slots (arXiv 2306.02577, after VICReg, Bardes et al. 2022):

        Z = z - mean(z),  C = Z^T Z / (N - 1),  c(z) = sum_{i != j} C_ij^2 / D      ("dim", the paper)
                                                       or / D^2                      ("dim2", the reported runs)

    z (N, D) with N = B * K slots. Returns a scalar.
    """
    if normalize not in ("dim", "dim2"):
        raise ValueError(f"covariance_loss: normalize={normalize!r}; expected 'dim' or 'dim2'")
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"covariance_loss: z has shape {tuple(z.shape)}; expected (N, D) with N >= 2")
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    off = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return off / (d if normalize == "dim" else d * d)


def variance_loss(z, gamma=1.0, eps=1e-4):
    """VICReg variance hinge (Bardes et al. 2022; arXiv 2306.02577): v(z) = mean_j max(0, gamma - sqrt(Var(z_j) + eps)),
    the unbiased variance of each column of z (N, D). Returns a scalar."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def cosine_slot_loss(slots, margin=0.2):
    """Cosine slot-similarity penalty (COSINELOSS, arXiv 2306.02577):

        mean_b 1/K^2 sum_{i != j} max(0, cos(s_bi, s_bj) - margin)

    averaged over all K^2 ordered pairs, the diagonal ones contributing 0, as the authors' code does
    (robert1003/slot-attention-disentanglement be8d9c8 model.py: torch's cosine_embedding_loss over the K^2 pairs,
    target +1 on the diagonal, whose 1 - cos(s, s) is 0 up to rounding). The mean over the K(K-1) distinct pairs
    is this times K / (K - 1). slots (B, K, D); K = 1 gives 0. Returns a scalar.
    """
    b, k, _ = slots.shape
    unit = F.normalize(slots, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (B, K, K)
    off = ~torch.eye(k, dtype=torch.bool, device=slots.device)
    return F.relu(cos[:, off] - margin).sum() / (b * k * k)  # (B, K*(K-1)) summed, / all B*K^2 pairs


def pixel_entropy(masks, eps=1e-8):
    """Mean per-pixel mask entropy (Vikstrom & Ilin 2022, eq. 5): mean_{b, pixels} -sum_k m_k log m_k.

    masks (B, K, H, W) or (B, K, N), summing to 1 over K. 0 log 0 = 0; the log is taken of m clamped to eps, so
    masks of exactly 0 and 1 give a finite value and finite gradients. Returns a scalar.
    """
    return -(masks * torch.log(masks.clamp_min(eps))).sum(dim=1).mean()


def object_entropy(masks, eps=1e-8):
    """Entropy of the per-slot mean mask (Vikstrom & Ilin 2022, eq. 6):

        p_k = mean_pixels m_k,   mean_b -sum_k p_k log p_k

    (minimising it favours using few slots). masks (B, K, ...) summing to 1 over K. Returns a scalar.
    """
    p = masks.flatten(2).mean(dim=2)  # (B, K)
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=1).mean()


# --- Siamese self-supervision (SimSiam, SwAV), on matched slots of two views

def simsiam_loss(p1, z2, p2, z1):
    """Symmetrised negative cosine of SimSiam (Chen & He 2021, arXiv 2011.10566, eqs. 1-2 and Algorithm 1):

        L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D(p, z) = -mean_n cos(p_n, z_n)

    p = predictor outputs, z = projector outputs, rows n paired across the views; (..., P) each, any leading
    shape. The stop-gradient is the method (without it SimSiam collapses, Sec. 4.1): no gradient reaches z1, z2
    through this term. Returns a scalar in [-1, 1]; -1 when every prediction points along its target.
    """
    def d(p, z):
        return -F.cosine_similarity(p, z.detach(), dim=-1).mean()
    return d(p1, z2) / 2 + d(p2, z1) / 2


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iters=3):
    """Soft codes by Sinkhorn-Knopp with equal partition (Caron et al. 2020, arXiv 2006.09882, Sec. 3.1 and
    facebookresearch/swav main_swav.py distributed_sinkhorn: epsilon 0.05, 3 iterations).

    scores (N, P): N samples against P prototypes. With Q = exp(scores / epsilon)^T (P, N) normalised to sum 1,
    each iteration scales the rows (prototypes) to 1/P and then the columns (samples) to 1/N; the result is
    returned transposed and times N, so every sample's code sums to 1 (a column marginal of Q, exact) and every
    prototype receives about N/P of the mass (a row marginal, exact only in the limit of many iterations).
    No gradient (the codes are targets). Returns (N, P) in the dtype of scores.
    """
    # exp(s/eps - max): the constant cancels in the normalisations and keeps exp finite (s/eps reaches 20 for
    # cosine scores; the reference code takes exp unshifted in fp32)
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))  # at least fp32 under bf16 autocast
    q = torch.exp((s - s.max()) / epsilon).T  # (P, N)
    q = q / q.sum()
    n_proto, n = q.shape
    for _ in range(iters):
        q = q / (q.sum(dim=1, keepdim=True) * n_proto)  # each prototype: total mass 1/P
        q = q / (q.sum(dim=0, keepdim=True) * n)  # each sample: total mass 1/N
    return (q * n).T.to(scores.dtype)  # (N, P), rows sum to 1


def swav_loss(scores1, scores2, temperature=0.1, epsilon=0.05, iters=3):
    """Swapped prediction of SwAV (arXiv 2006.09882, eq. 2-3; facebookresearch/swav main_swav.py):

        L = -1/(2N) sum_n [ q2_n . log softmax(s1_n / T) + q1_n . log softmax(s2_n / T) ],  q = sinkhorn(s)

    scores (N, P): cosines of the L2-normalised projections with the normalised prototypes; row n of the two
    views describes the same thing (here: matched slots). Each view's codes come from Sinkhorn over its own N
    rows (no gradient); temperature 0.1, epsilon 0.05, 3 iterations as the reference. Returns a scalar.
    """
    q1, q2 = sinkhorn(scores1, epsilon, iters), sinkhorn(scores2, epsilon, iters)
    ce12 = -(q2 * F.log_softmax(scores1 / temperature, dim=-1)).sum(dim=-1).mean()  # view 1 predicts view 2's code
    ce21 = -(q1 * F.log_softmax(scores2 / temperature, dim=-1)).sum(dim=-1).mean()
    return (ce12 + ce21) / 2
