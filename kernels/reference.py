"""Plain PyTorch reference ops: the definition of every fused kernel in this package.

Everything here is ordinary, differentiable PyTorch that works in any floating dtype (float64
included). Half-precision inputs (float16 / bfloat16) are upcast to float32 first, so every
reduction accumulates in at least float32; float32 and float64 inputs are used as they are.

Notation: ``z`` natural logits (B, C), ``z_adv`` adversarial logits (B, C), ``y`` labels (B,) int64,
``p = softmax(z)``, ``q = softmax(z_adv)``. Per-sample quantities have shape (B,).

* ``ce_nat = logsumexp(z) - z[y]``, ``ce_adv = logsumexp(z_adv) - z_adv[y]``
* ``kl = sum_c p (log p - log q)`` from log-softmax; the target p is *not* detached.
* ``entropy = -sum_c p log(p + entropy_eps)``
* ``wrong_idx = argmax_{c != y} q`` (ties -> lowest index); it is taken on the masked logits,
  which is the same argmax as on q in exact arithmetic (softmax is strictly increasing) and
  does not turn distinct logits into ties when q underflows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LossHead", "LossOutput", "loss_head", "trades_loss", "dtrades_loss", "dtrades_weight", "mart_loss",
           "pgd_step", "kl_divergence", "normalize_batch", "NORMALIZE_MODES", "PGD_NORMS", "MART_EPS"]

NORMALIZE_MODES = ("minmax", "mean", "none")
PGD_NORMS = ("linf", "l2")
#: MART's ``-log(1.0001 - q_wrong)``: 1.0001 = 1 + MART_EPS.
MART_EPS = 1e-4
#: Denominator guard of the PGD steps (``g / (||g|| + 1e-12)`` and the L2 projection).
PGD_TINY = 1e-12


class LossHead(NamedTuple):
    """Per-sample statistics of a (natural, adversarial) logit pair; all (B,).

    Float fields are float32 (float64 when the reference op gets float64 logits); ``wrong_idx`` is int64."""
    ce_nat: torch.Tensor
    ce_adv: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    p_y: torch.Tensor
    q_y: torch.Tensor
    q_wrong: torch.Tensor
    wrong_idx: torch.Tensor


class LossOutput(NamedTuple):
    """A loss and the per-sample statistics computed with it (once, in the same pass)."""
    loss: torch.Tensor                 # scalar, differentiable w.r.t. both logit tensors
    head: LossHead                     # detached per-sample statistics
    lam: torch.Tensor | None = None    # D-TRADES: the per-sample KL weight used (detached)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision floats to float32 (the accumulation dtype); keep float32/float64."""
    if not t.is_floating_point():
        raise TypeError(f"expected a floating point tensor, got {t.dtype}")
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_logits(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor) -> None:
    if z.dim() != 2 or z.shape != z_adv.shape:
        raise ValueError(f"logits must both be (B, C) with the same shape, got {tuple(z.shape)} "
                         f"and {tuple(z_adv.shape)}")
    if y.shape != z.shape[:1]:
        raise ValueError(f"labels must be (B,) = {tuple(z.shape[:1])}, got {tuple(y.shape)}")


def _per_sample(v, like: torch.Tensor) -> torch.Tensor:
    """A python float or a (B,) tensor as a constant (detached) tensor in ``like``'s dtype."""
    if isinstance(v, torch.Tensor):
        if v.dim() not in (0, 1) or (v.dim() == 1 and v.shape[0] != like.shape[0]):
            raise ValueError(f"per-sample weights must be a scalar or ({like.shape[0]},), got {tuple(v.shape)}")
        return v.detach().to(device=like.device, dtype=like.dtype)
    return torch.full_like(like, float(v))


def _log_softmax_pair(z, z_adv):
    return F.log_softmax(_acc(z), dim=1), F.log_softmax(_acc(z_adv), dim=1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(p || q) = sum_c p (log p - log q)`` from log-probabilities (B, C) -> (B,)."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def _ce(log_prob: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -log_prob.gather(1, y[:, None]).squeeze(1)


def _entropy(log_p: torch.Tensor, entropy_eps: float) -> torch.Tensor:
    p = log_p.exp()
    return -(p * torch.log(p + entropy_eps)).sum(1)


def _wrong_idx(z_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    masked = z_adv.detach().scatter(1, y[:, None], float("-inf"))
    return masked.argmax(1)


def normalize_batch(v: torch.Tensor, mode: str, reduce=None) -> torch.Tensor:
    """Batch normalisation of a non-negative per-sample statistic (D-TRADES' H and s).

    ``minmax``: (v - min) / (max - min), 0.5 everywhere when max == min;
    ``mean``: v / mean(v), 1 everywhere when mean(v) == 0; ``none``: v.
    ``reduce(t, op)`` (op "max" or "sum"), when given, combines the batch statistics across
    processes (an all-reduce), so that v is normalised over the global batch."""
    if mode == "minmax":
        if reduce is None:
            lo, hi = v.min(), v.max()
        else:
            neg_lo, hi = reduce(torch.stack([-v.min(), v.max()]), "max").unbind(0)
            lo = -neg_lo
        span = hi - lo
        spread = span > 0
        return torch.where(spread, (v - lo) / torch.where(spread, span, torch.ones_like(span)),
                           torch.full_like(v, 0.5))
    if mode == "mean":
        if reduce is None:
            m = v.mean()
        else:
            total, count = reduce(torch.stack([v.sum(), v.new_tensor(float(v.numel()))]), "sum").unbind(0)
            m = total / count
        nonzero = m != 0
        return torch.where(nonzero, v / torch.where(nonzero, m, torch.ones_like(m)), torch.ones_like(v))
    if mode == "none":
        return v
    raise ValueError(f"unknown normalisation {mode!r}; valid: {', '.join(NORMALIZE_MODES)}")


def _head(log_p: torch.Tensor, log_q: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor,
          entropy_eps: float) -> LossHead:
    with torch.no_grad():
        log_p, log_q = log_p.detach(), log_q.detach()
        idx = _wrong_idx(_acc(z_adv), y)
        p_y = log_p.gather(1, y[:, None]).squeeze(1).exp()
        q_y = log_q.gather(1, y[:, None]).squeeze(1).exp()
        q_wrong = log_q.gather(1, idx[:, None]).squeeze(1).exp()
        return LossHead(_ce(log_p, y), _ce(log_q, y), kl_divergence(log_p, log_q), _entropy(log_p, entropy_eps),
                        p_y, q_y, q_wrong, idx)


def loss_head(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, entropy_eps: float = 1e-12) -> LossHead:
    """Per-sample statistics (forward only, no autograd): see :class:`LossHead`."""
    _check_logits(z, z_adv, y)
    with torch.no_grad():
        log_p, log_q = _log_softmax_pair(z, z_adv)
        return _head(log_p, log_q, z_adv, y, entropy_eps)


def _weighted_mean(per: torch.Tensor, sample_weight) -> torch.Tensor:
    if sample_weight is not None:
        per = per * _per_sample(sample_weight, per)
    return per.mean()


def trades_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, kl_weight,
                sample_weight: torch.Tensor | None = None) -> LossOutput:
    """``(1/B) sum_i c_i (ce_nat_i + w_i kl_i)``, with the batch's :class:`LossHead`.

    ``kl_weight`` w is a float or a (B,) tensor, ``sample_weight`` c an optional (B,) tensor; both are
    constants (no gradient flows into them). Gradients flow into both ``z`` and ``z_adv``."""
    _check_logits(z, z_adv, y)
    log_p, log_q = _log_softmax_pair(z, z_adv)
    w = _per_sample(kl_weight, log_p[:, 0])
    loss = _weighted_mean(_ce(log_p, y) + w * kl_divergence(log_p, log_q), sample_weight)
    return LossOutput(loss, _head(log_p, log_q, z_adv, y, 1e-12))


def dtrades_weight(entropy: torch.Tensor, sensitivity: torch.Tensor, alpha: float, beta: float,
                   normalize: str = "minmax", lambda_scale: float = 1.0, reduce=None) -> torch.Tensor:
    """D-TRADES' per-sample KL weight ``lam = lambda_scale (alpha norm(H) + beta norm(s))``, detached
    (``reduce``: see :func:`normalize_batch`)."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalisation {normalize!r}; valid: {', '.join(NORMALIZE_MODES)}")
    with torch.no_grad():
        s = _per_sample(sensitivity, entropy)
        return lambda_scale * (alpha * normalize_batch(entropy.detach(), normalize, reduce)
                               + beta * normalize_batch(s, normalize, reduce))


def dtrades_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, sensitivity: torch.Tensor,
                 alpha: float, beta: float, normalize: str = "minmax", lambda_scale: float = 1.0,
                 entropy_eps: float = 1e-12, sample_weight: torch.Tensor | None = None,
                 reduce=None) -> LossOutput:
    """D-TRADES: :func:`trades_loss` with ``kl_weight =`` :func:`dtrades_weight` of the clean entropy H and
    the sensitivity s. ``reduce`` normalises H and s over the global batch (see :func:`normalize_batch`).
    Returns the loss, the :class:`LossHead` and ``lam``."""
    _check_logits(z, z_adv, y)
    log_p, log_q = _log_softmax_pair(z, z_adv)
    head = _head(log_p, log_q, z_adv, y, entropy_eps)
    lam = dtrades_weight(head.entropy, sensitivity, alpha, beta, normalize, lambda_scale, reduce)
    loss = _weighted_mean(_ce(log_p, y) + lam * kl_divergence(log_p, log_q), sample_weight)
    return LossOutput(loss, head, lam)


def mart_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, beta: float,
              sample_weight: torch.Tensor | None = None) -> LossOutput:
    """MART: ``(1/B) sum_i c_i (ce_adv_i - log(1.0001 - q_wrong_i) + beta kl_i (1 - p_y_i))``, with the
    batch's :class:`LossHead`. Gradients flow through q_wrong (its value), kl and p_y (not detached, as in
    the official code)."""
    _check_logits(z, z_adv, y)
    log_p, log_q = _log_softmax_pair(z, z_adv)
    q = log_q.exp()
    idx = _wrong_idx(_acc(z_adv), y)
    q_wrong = q.gather(1, idx[:, None]).squeeze(1)
    p_y = log_p.gather(1, y[:, None]).squeeze(1).exp()
    per = _ce(log_q, y) - torch.log(1.0 + MART_EPS - q_wrong) + beta * kl_divergence(log_p, log_q) * (1.0 - p_y)
    return LossOutput(_weighted_mean(per, sample_weight), _head(log_p, log_q, z_adv, y, 1e-12))


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, step_size: float, eps: float,
             norm: str = "linf"):
    """One projected gradient ascent step; returns ``(x_new, grad_norm)`` (no autograd).

    ``linf``: ``clamp(min(max(x_adv + step sign(g), x_nat - eps), x_nat + eps), 0, 1)``;
    ``l2``: ``x1 = x_adv + step g / (||g|| + 1e-12)``, ``d = x1 - x_nat`` scaled by
    ``min(1, eps / (||d|| + 1e-12))``, ``clamp(x_nat + d, 0, 1)``. Norms are per sample over all
    non-batch dims; ``grad_norm`` (B,) is ``||g_i||_2`` in float32 (float64 for float64 input).
    ``x_new`` has ``x_adv``'s dtype and memory format."""
    if norm not in PGD_NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(PGD_NORMS)}")
    if x_adv.shape != grad.shape or x_adv.shape != x_nat.shape:
        raise ValueError(f"x_adv, grad and x_nat must have one shape, got {tuple(x_adv.shape)}, "
                         f"{tuple(grad.shape)}, {tuple(x_nat.shape)}")
    with torch.no_grad():
        xa, g, xn = _acc(x_adv), _acc(grad), _acc(x_nat)
        view = (-1,) + (1,) * (x_adv.dim() - 1)
        g_norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        if norm == "linf":
            x_new = torch.min(torch.max(xa + step_size * g.sign(), xn - eps), xn + eps)
        else:
            x1 = xa + step_size * g / (g_norm.view(view) + PGD_TINY)
            d = x1 - xn
            d_norm = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
            d = d * torch.clamp(eps / (d_norm + PGD_TINY), max=1.0).view(view)
            x_new = xn + d
        out = torch.empty_like(x_adv)
        out.copy_(x_new.clamp(0.0, 1.0))
        return out, g_norm
