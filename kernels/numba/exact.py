"""EXACT (expected accuracy under Gaussian logit noise) on the CPU. Math: specs/exact.md section 6.

Per row with label y and r_i = min(s_y - s_i, M) / sigma over the competitors i != y:
    S_k = sum_i log Phi(r_i + t_k),  P = sum_k w_k exp(S_k)        (Gauss-Hermite nodes t_k, w_k)
    G_i = sum_k w_k exp(S_k + log phi(r_i + t_k) - log Phi(r_i + t_k)) = dP/dr_i
The label's own column gets r_y = +inf, so log Phi = 0 and G_y = 0: it needs no special case in the
sums. Rows run in parallel; for each node the sum over classes is one vectorised pass.
"""
import math

import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS, fast_exp, like, log_ndtr

_JIT = dict(JIT_OPTIONS, cache=True)
_HALF_LOG_2PI = 0.9189385332046727


@njit(**_JIT)
def _scaled_margins(s, y, inv_sigma, margin, r):
    """r_i = min(s_y - s_i, margin) / sigma, and +inf at the label."""
    sy = s[y]
    for i in range(s.shape[0]):
        r[i] = min(sy - s[i], margin) * inv_sigma
    r[y] = like(s, np.inf)


@njit(parallel=True, **_JIT)
def _forward(logits, labels, inv_sigma, margin, nodes, log_weights, log_terms, prob):
    n_classes = logits.shape[1]
    for b in prange(logits.shape[0]):
        y = labels[b]
        if y < 0:  # ignored row
            log_terms[b, :] = 0
            prob[b] = 1.0
            continue
        r = np.empty(n_classes, logits.dtype)
        _scaled_margins(logits[b], y, inv_sigma[b], like(logits, margin), r)
        total = 0.0
        for k in range(nodes.shape[0]):
            node = nodes[k]
            acc = like(logits, 0.0)
            for i in range(n_classes):
                acc += log_ndtr(r[i] + node)
            log_terms[b, k] = acc
            total += math.exp(log_weights[k] + acc)
        prob[b] = total


@njit(parallel=True, **_JIT)
def _backward(logits, labels, inv_sigma, margin, nodes, log_weights, log_terms, grad_prob,
              grad_logits, grad_sigma):
    n_classes = logits.shape[1]
    half = like(logits, 0.5)
    for b in prange(logits.shape[0]):
        y = labels[b]
        if y < 0:
            grad_logits[b, :] = 0
            grad_sigma[b] = 0
            continue
        s = logits[b]
        inv = like(logits, inv_sigma[b])
        r = np.empty(n_classes, logits.dtype)
        _scaled_margins(s, y, inv, like(logits, margin), r)
        dp_dr = np.zeros(n_classes, logits.dtype)
        for k in range(nodes.shape[0]):
            node = nodes[k]
            base = like(logits, log_weights[k] + log_terms[b, k] - _HALF_LOG_2PI)
            for i in range(n_classes):
                x = r[i] + node
                dp_dr[i] += fast_exp(base - half * x * x - log_ndtr(x))
        g = like(logits, grad_prob[b])
        sum_label = like(logits, 0.0)
        sum_sigma = like(logits, 0.0)
        sy = s[y]
        for i in range(n_classes):
            # the margin clip passes no gradient above M (torch.clamp passes it at equality)
            d = dp_dr[i] * inv if sy - s[i] <= margin else like(logits, 0.0)
            grad_logits[b, i] = -g * d
            sum_label += d
            sum_sigma += r[i] * dp_dr[i] if i != y else like(logits, 0.0)
        grad_logits[b, y] = g * sum_label
        grad_sigma[b] = -g * inv * sum_sigma


# ---- launch functions ---------------------------------------------------------------------------


def _work(logits):
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def exact_forward(logits, labels, sigma_rows, margin, nodes, log_weights):
    """logits [B, C]; labels [B] int64 (-1 = ignored row); sigma_rows [B]; margin float (inf for
    none); nodes, log_weights [K] float64. Returns (P [B], S [B, K]) in the compute dtype."""
    work = _work(logits)
    prob = torch.empty(work.shape[0], dtype=work.dtype)
    log_terms = torch.empty(work.shape[0], nodes.shape[0], dtype=work.dtype)
    inv_sigma = (1.0 / sigma_rows.detach().to(work.dtype)).contiguous()
    _forward(work.detach().numpy(), labels.numpy(), inv_sigma.numpy(), float(margin), nodes.numpy(),
             log_weights.numpy(), log_terms.numpy(), prob.numpy())
    return prob, log_terms


def exact_backward(logits, labels, sigma_rows, margin, nodes, log_weights, log_terms, grad_prob):
    """Returns (grad_logits in logits.dtype, grad_sigma_rows [B])."""
    work = _work(logits)
    grad_logits = torch.empty_like(work)
    grad_sigma = torch.empty(work.shape[0], dtype=work.dtype)
    inv_sigma = (1.0 / sigma_rows.detach().to(work.dtype)).contiguous()
    _backward(work.detach().numpy(), labels.numpy(), inv_sigma.numpy(), float(margin), nodes.numpy(),
              log_weights.numpy(), log_terms.numpy(), grad_prob.detach().to(work.dtype).contiguous().numpy(),
              grad_logits.numpy(), grad_sigma.numpy())
    return grad_logits.to(logits.dtype), grad_sigma
