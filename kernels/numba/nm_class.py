"""The "n x m classification" loss L1 (specs/nm_class.md) on the CPU, one sample block per task.

Per sample s [n, m], targets t (soft [n, m], or integer classes [n], negative = padding task):
    lse_i  = lse_k s_ik                                       (row reduction over m)
    z_ij   = log t_ij + lse_i - s_ij + log1mexp(s_ij - lse_i)  (t_ij > 0 only)
    logA_j = lse([z_1j .. z_nj, 0])                           (column reduction over n, appended zero)
    L      = sum_j logA_j
    dL/ds_ij = p_ij W_i - w_ij,  w_ij = exp(z'_ij - logA_j) with z'_ij = log t_ij + lse_i - s_ij, W_i = sum_j w_ij
Samples run in parallel; the statistics (lse [n], logA [m]) are saved for the backward.
"""
import math

import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS, fast_exp, like
from ._tensors import compute_view

_JIT = dict(JIT_OPTIONS, cache=True)
_LN2 = 0.6931471805599453


@njit(inline="always", **_JIT)
def _target(soft, labels, b, i, j):
    """t_ij of sample b: soft targets, or 1 where labels[b, i] == j when soft is empty."""
    if soft.shape[0] == 0:
        return 1.0 if labels[b, i] == j else 0.0
    return float(soft[b, i, j])


@njit(inline="always", **_JIT)
def _log1mexp(x):
    """log(1 - e^x) for x <= 0."""
    if x > -_LN2:
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


@njit(**_JIT)
def _row_lse(s, lse):
    for i in range(s.shape[0]):
        top = -np.inf
        for j in range(s.shape[1]):
            top = max(top, s[i, j])
        total = like(s, 0.0)
        for j in range(s.shape[1]):
            total += fast_exp(s[i, j] - top)
        lse[i] = top + math.log(total)


@njit(parallel=True, **_JIT)
def _forward(logits, soft, labels, loss, lse, log_a):
    n, m = logits.shape[1], logits.shape[2]
    for b in prange(logits.shape[0]):
        s = logits[b]
        _row_lse(s, lse[b])
        col_max = np.zeros(m)  # the appended zero: each column starts at (max 0, sum 1)
        col_sum = np.ones(m)
        for i in range(n):
            for j in range(m):
                t = _target(soft, labels, b, i, j)
                if t > 0.0:
                    x = float(s[i, j]) - lse[b, i]  # log p_ij <= 0
                    z = math.log(t) - x + _log1mexp(min(x, 0.0))
                    if z > col_max[j]:
                        col_sum[j] = col_sum[j] * math.exp(col_max[j] - z) + 1.0
                        col_max[j] = z
                    else:
                        col_sum[j] += math.exp(z - col_max[j])
        total = 0.0
        for j in range(m):
            log_a[b, j] = col_max[j] + math.log(col_sum[j])
            total += log_a[b, j]
        loss[b] = total


@njit(parallel=True, **_JIT)
def _backward(logits, soft, labels, lse, log_a, grad_loss, grad_logits):
    n, m = logits.shape[1], logits.shape[2]
    for b in prange(logits.shape[0]):
        g = float(grad_loss[b])
        w = np.empty(m)
        for i in range(n):
            lse_i = float(lse[b, i])
            w_sum = 0.0
            for j in range(m):
                t = _target(soft, labels, b, i, j)
                w[j] = math.exp(math.log(t) + lse_i - float(logits[b, i, j]) - log_a[b, j]) if t > 0.0 else 0.0
                w_sum += w[j]
            for j in range(m):
                p = math.exp(float(logits[b, i, j]) - lse_i)
                grad_logits[b, i, j] = g * (p * w_sum - w[j])


# ---- launch functions: contiguous CPU tensors [B, n, m] in, tensors out --------------------------

_NO_SOFT = np.zeros((0, 1, 1), np.float64)
_NO_LABELS = np.zeros((1, 1), np.int64)


def _targets_arrays(targets):
    if targets.dtype.is_floating_point:
        return compute_view(targets).numpy(), _NO_LABELS
    return _NO_SOFT, targets.to(torch.int64).numpy()


def nm_class_forward(logits, targets):
    """logits [B, n, m]; targets soft [B, n, m] or integer [B, n] (validated).
    Returns (loss [B], lse [B, n], logA [B, m]) in float64 (the statistics are small)."""
    work = compute_view(logits)
    n_samples, n, m = work.shape
    loss = torch.empty(n_samples, dtype=torch.float64)
    lse = torch.empty(n_samples, n, dtype=torch.float64)
    log_a = torch.empty(n_samples, m, dtype=torch.float64)
    soft, labels = _targets_arrays(targets)
    _forward(work.numpy(), soft, labels, loss.numpy(), lse.numpy(), log_a.numpy())
    return loss, lse, log_a


def nm_class_backward(logits, targets, lse, log_a, grad_loss):
    """Returns grad_logits [B, n, m] in logits.dtype."""
    work = compute_view(logits)
    grad = torch.empty_like(work)
    soft, labels = _targets_arrays(targets)
    _backward(work.numpy(), soft, labels, lse.numpy(), log_a.numpy(), grad_loss.to(torch.float64).contiguous().numpy(),
              grad.numpy())
    return grad.to(logits.dtype)
