"""EXACT (expected accuracy under Gaussian logit noise) on the CPU. Math: docs/exact.md, 'Stable forms'.

Per row with label y and r_i = min(s_y - s_i, M) / sigma over the competitors i != y:
    S_k = sum_i log Phi(r_i + t_k),  P = sum_k w_k exp(S_k)        (Gauss-Hermite nodes t_k, w_k)
    G_i = sum_k w_k exp(S_k + log phi(r_i + t_k) - log Phi(r_i + t_k)) = dP/dr_i
The label's own column gets r_y = +inf, so log Phi = 0 and G_y = 0: it needs no special case in the
sums. r saturates at +-R_MAX, where log Phi(r + t) is exactly 0 or very negative but finite, so
infinite logits and 1/sigma = inf (sigma -> 0: the hard argmax) give no inf - inf; ties (s_i = s_y,
infinite ones included) get r = 0. The backward accumulates G_i / sigma with log(1/sigma) inside
the exponent, so an underflowed G is never scaled up by a huge 1/sigma; rows with 1/sigma = inf
get zero gradients. Rows run in parallel; for each node the sum over classes is one vectorised pass.
"""
import math

import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS, like, log_ndtr, scaled_mills_inverse
from ._tensors import compute_view

_JIT = dict(JIT_OPTIONS, cache=True)
R_MAX = 1e4  # |r| beyond this changes nothing: Phi(r + t) is 0 or 1 to every precision, for any node t


@njit(**_JIT)
def _scaled_margins(s, y, inv_sigma, margin, r):
    """r_i = min(s_y - s_i, margin) / sigma clipped to +-R_MAX, 0 at ties, +inf at the label.
    Returns whether the row holds a NaN logit (the float32 log Phi works on the bits and would turn
    a NaN into a number)."""
    sy = s[y]
    bound = like(s, R_MAX)
    zero = like(s, 0.0)
    has_nan = False
    for i in range(s.shape[0]):
        m = sy - s[i]
        m = margin if m > margin else m
        ri = m * inv_sigma
        ri = bound if ri > bound else ri
        ri = -bound if ri < -bound else ri
        r[i] = zero if (m == zero) | (s[i] == sy) else ri
        has_nan |= s[i] != s[i]
    r[y] = like(s, np.inf)
    return has_nan


@njit(**_JIT)
def _node_sums(r, node):
    """sum_i log Phi(r_i + t) over one row: one vectorised pass."""
    acc = like(r, 0.0)
    for i in range(r.shape[0]):
        acc += log_ndtr(r[i] + node)
    return acc


@njit(**_JIT)
def _add_node_density(r, node, base, acc):
    """acc_i += exp(base) phi(r_i + t) / Phi(r_i + t), with base = log w + S - log sigma."""
    for i in range(r.shape[0]):
        acc[i] += scaled_mills_inverse(r[i] + node, base)


@njit(**_JIT)
def _forward_row(s, y, inv_sigma, margin, nodes, log_weights, log_terms):
    r = np.empty(s.shape[0], s.dtype)
    if _scaled_margins(s, y, inv_sigma, margin, r):
        log_terms[:] = np.nan
        return np.nan
    total = 0.0
    for k in range(nodes.shape[0]):
        log_terms[k] = _node_sums(r, like(s, nodes[k]))
        total += math.exp(log_weights[k] + log_terms[k])
    return total


@njit(**_JIT)
def _backward_row(s, y, inv_sigma, margin, nodes, log_weights, log_terms, g, grad_s):
    """Writes g * dP/ds into grad_s and returns g * dP/dsigma."""
    zero = like(s, 0.0)
    if inv_sigma == np.inf:  # the sigma -> 0 limit: a step function of the logits
        grad_s[:] = zero
        return zero
    r = np.empty(s.shape[0], s.dtype)
    if _scaled_margins(s, y, inv_sigma, margin, r):
        grad_s[:] = like(s, np.nan)
        return like(s, np.nan)
    dp_ds = np.zeros(s.shape[0], s.dtype)  # G_i / sigma
    log_inv_sigma = math.log(inv_sigma)
    for k in range(nodes.shape[0]):
        _add_node_density(r, like(s, nodes[k]), like(s, log_weights[k] + log_terms[k] + log_inv_sigma), dp_ds)
    sum_label = zero
    sum_sigma = zero
    sy = s[y]
    for i in range(s.shape[0]):
        # the margin clip passes no gradient above M (torch.clamp passes it at equality); a tie of
        # infinite logits (NaN difference) passes none either
        d = dp_ds[i] if sy - s[i] <= margin else zero
        grad_s[i] = -g * d
        sum_label += d
        sum_sigma += r[i] * dp_ds[i] if i != y else zero
    grad_s[y] = g * sum_label
    return -g * sum_sigma


@njit(parallel=True, **_JIT)
def _forward(logits, labels, inv_sigma, margin, nodes, log_weights, log_terms, prob):
    for b in prange(logits.shape[0]):
        if labels[b] < 0:  # ignored row
            log_terms[b, :] = 0
            prob[b] = 1.0
        else:
            prob[b] = _forward_row(logits[b], labels[b], like(logits, inv_sigma[b]), like(logits, margin),
                                   nodes, log_weights, log_terms[b])


@njit(parallel=True, **_JIT)
def _backward(logits, labels, inv_sigma, margin, nodes, log_weights, log_terms, grad_prob,
              grad_logits, grad_sigma):
    for b in prange(logits.shape[0]):
        if labels[b] < 0:
            grad_logits[b, :] = 0
            grad_sigma[b] = 0
        else:
            grad_sigma[b] = _backward_row(logits[b], labels[b], like(logits, inv_sigma[b]), like(logits, margin),
                                          nodes, log_weights, log_terms[b], like(logits, grad_prob[b]),
                                          grad_logits[b])


# ---- launch functions ---------------------------------------------------------------------------


def exact_forward(logits, labels, sigma_rows, margin, nodes, log_weights):
    """logits [B, C]; labels [B] int64 (-1 = ignored row); sigma_rows [B]; margin float (inf for
    none); nodes, log_weights [K] float64. Returns (P [B], S [B, K]) in the compute dtype."""
    work = compute_view(logits)
    prob = torch.empty(work.shape[0], dtype=work.dtype)
    log_terms = torch.empty(work.shape[0], nodes.shape[0], dtype=work.dtype)
    inv_sigma = (1.0 / sigma_rows.detach().to(work.dtype)).contiguous()
    _forward(work.detach().numpy(), labels.numpy(), inv_sigma.numpy(), float(margin), nodes.numpy(),
             log_weights.numpy(), log_terms.numpy(), prob.numpy())
    return prob, log_terms


def exact_backward(logits, labels, sigma_rows, margin, nodes, log_weights, log_terms, grad_prob):
    """Returns (grad_logits in logits.dtype, grad_sigma_rows [B])."""
    work = compute_view(logits)
    grad_logits = torch.empty_like(work)
    grad_sigma = torch.empty(work.shape[0], dtype=work.dtype)
    inv_sigma = (1.0 / sigma_rows.detach().to(work.dtype)).contiguous()
    _backward(work.detach().numpy(), labels.numpy(), inv_sigma.numpy(), float(margin), nodes.numpy(),
              log_weights.numpy(), log_terms.numpy(), grad_prob.detach().to(work.dtype).contiguous().numpy(),
              grad_logits.numpy(), grad_sigma.numpy())
    return grad_logits.to(logits.dtype), grad_sigma
