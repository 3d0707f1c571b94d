"""The "n x m classification" loss L1 (docs/nm_class.md) on the CPU, one sample block per task.

Per sample s [n, m], targets t (soft [n, m], or integer classes [n], negative = padding task):
    lse_i  = lse_k s_ik                                       (row reduction over m)
    z_ij   = log t_ij + lse_i - s_ij + log1mexp(s_ij - lse_i)  (t_ij > 0 only)
    logA_j = lse([z_1j .. z_nj, 0])                           (column reduction over n, appended zero)
    L      = sum_j logA_j
    dL/ds_ij = p_ij W_i - w_ij,  w_ij = exp(z'_ij - logA_j) with z'_ij = log t_ij + lse_i - s_ij, W_i = sum_j w_ij
Samples run in parallel; the statistics (lse [n], logA [m]) are saved for the backward. Integer
targets touch one column per task (w has one non-zero), so both passes skip the others.
"""
import math

import numpy as np
import torch
from numba import njit, prange

from ._math import JIT_OPTIONS, fast_exp, like, row_max
from ._tensors import compute_view

_JIT = dict(JIT_OPTIONS, cache=True)
_LN2 = 0.6931471805599453


@njit(inline="always", **_JIT)
def _log1mexp(x):
    """log(1 - e^x) for x <= 0."""
    if x > -_LN2:
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


@njit(**_JIT)
def _row_lse(s, lse):
    for i in range(s.shape[0]):
        top = row_max(s[i])  # in the array dtype: float32 rows vectorise below
        total = like(s, 0.0)
        for j in range(s.shape[1]):
            total += fast_exp(s[i, j] - top)
        lse[i] = top + math.log(total)


@njit(inline="always", **_JIT)
def _add_to_column(z, j, col_max, col_sum):
    """Fold z into the running logsumexp of column j."""
    if z > col_max[j]:
        col_sum[j] = col_sum[j] * math.exp(col_max[j] - z) + 1.0
        col_max[j] = z
    else:
        col_sum[j] += math.exp(z - col_max[j])


@njit(parallel=True, **_JIT)
def _forward(logits, soft, labels, loss, lse, log_a):
    n, m = logits.shape[1], logits.shape[2]
    for b in prange(logits.shape[0]):
        s = logits[b]
        _row_lse(s, lse[b])
        col_max = np.zeros(m)  # the appended zero: each column starts at (max 0, sum 1)
        col_sum = np.ones(m)
        for i in range(n):
            if soft.shape[0] == 0:  # integer targets: one class per task, none for a padding task
                j = labels[b, i]
                if j >= 0:
                    x = float(s[i, j]) - lse[b, i]  # log p_ij <= 0
                    _add_to_column(-x + _log1mexp(min(x, 0.0)), j, col_max, col_sum)
                continue
            for j in range(m):
                t = float(soft[b, i, j])
                if t > 0.0:
                    x = float(s[i, j]) - lse[b, i]
                    _add_to_column(math.log(t) - x + _log1mexp(min(x, 0.0)), j, col_max, col_sum)
        total = 0.0
        for j in range(m):
            log_a[b, j] = col_max[j] + math.log(col_sum[j])
            total += log_a[b, j]
        loss[b] = total


@njit(parallel=True, **_JIT)
def _backward(logits, soft, labels, lse, log_a, grad_loss, grad_logits):
    """dL/ds_ij = g (p_ij W_i - w_ij); p in the array dtype with fast_exp, so the full pass over the
    row vectorises; the few w_ij (t_ij > 0) in float64."""
    n, m = logits.shape[1], logits.shape[2]
    for b in prange(logits.shape[0]):
        g = float(grad_loss[b])
        w = np.zeros(m)
        for i in range(n):
            lse_i = float(lse[b, i])
            row = logits[b, i]
            out = grad_logits[b, i]
            w_sum = 0.0
            if soft.shape[0] == 0:
                j = labels[b, i]
                if j >= 0:
                    w_sum = math.exp(lse_i - float(row[j]) - log_a[b, j])
            else:
                for j in range(m):
                    t = float(soft[b, i, j])
                    w[j] = math.exp(math.log(t) + lse_i - float(row[j]) - log_a[b, j]) if t > 0.0 else 0.0
                    w_sum += w[j]
            scale = like(row, g * w_sum)
            shift = like(row, lse_i)
            for j in range(m):
                out[j] = scale * fast_exp(row[j] - shift)
            # the target columns again in float64: p W - w cancels as p -> 1
            if soft.shape[0] == 0:
                j = labels[b, i]
                if j >= 0:
                    out[j] = like(row, g * math.expm1(float(row[j]) - lse_i) * w_sum)  # W = w: (p - 1) w
            else:
                for j in range(m):
                    if w[j] > 0.0:
                        out[j] = like(row, g * (math.exp(float(row[j]) - lse_i) * w_sum - w[j]))


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
