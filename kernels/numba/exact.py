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

from ._math import JIT_OPTIONS, like, log_ndtr, scaled_mills_inverse
from ._tensors import compute_view

_JIT = dict(JIT_OPTIONS, cache=True)


@njit(**_JIT)
def _scaled_margins(s, y, inv_sigma, margin, r):
    """r_i = min(s_y - s_i, margin) / sigma, and +inf at the label."""
    sy = s[y]
    for i in range(s.shape[0]):
        r[i] = min(sy - s[i], margin) * inv_sigma
    r[y] = like(s, np.inf)


@njit(**_JIT)
def _node_sums(r, node):
    """sum_i log Phi(r_i + t) over one row: one vectorised pass."""
    acc = like(r, 0.0)
    for i in range(r.shape[0]):
        acc += log_ndtr(r[i] + node)
    return acc


@njit(**_JIT)
def _add_node_density(r, node, base, dp_dr):
    """dp_dr_i += exp(base) phi(r_i + t) / Phi(r_i + t), with base = log w + S."""
    for i in range(r.shape[0]):
        dp_dr[i] += scaled_mills_inverse(r[i] + node, base)


@njit(**_JIT)
def _forward_row(s, y, inv_sigma, margin, nodes, log_weights, log_terms):
    r = np.empty(s.shape[0], s.dtype)
    _scaled_margins(s, y, inv_sigma, margin, r)
    total = 0.0
    for k in range(nodes.shape[0]):
        log_terms[k] = _node_sums(r, like(s, nodes[k]))
        total += math.exp(log_weights[k] + log_terms[k])
    return total


@njit(**_JIT)
def _backward_row(s, y, inv_sigma, margin, nodes, log_weights, log_terms, g, grad_s):
    """Writes g * dP/ds into grad_s and returns g * dP/dsigma."""
    r = np.empty(s.shape[0], s.dtype)
    _scaled_margins(s, y, inv_sigma, margin, r)
    dp_dr = np.zeros(s.shape[0], s.dtype)
    for k in range(nodes.shape[0]):
        _add_node_density(r, like(s, nodes[k]), like(s, log_weights[k] + log_terms[k]), dp_dr)
    zero = like(s, 0.0)
    sum_label = zero
    sum_sigma = zero
    sy = s[y]
    for i in range(s.shape[0]):
        # the margin clip passes no gradient above M (torch.clamp passes it at equality)
        d = dp_dr[i] * inv_sigma if sy - s[i] <= margin else zero
        grad_s[i] = -g * d
        sum_label += d
        sum_sigma += r[i] * dp_dr[i] if i != y else zero
    grad_s[y] = g * sum_label
    return -g * inv_sigma * sum_sigma


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
