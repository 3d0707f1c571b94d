"""ZLPR (multi-label softmax cross-entropy) on the CPU: one fused pass forward, one backward.

Per row, with validity v_i (not masked, logit != -inf) and targets t_i in [0, 1]:
    pos stream a_i = -s_i + log t_i      (v_i and t_i > 0)
    neg stream b_i =  s_i + log(1 - t_i) (v_i and t_i < 1)
    LA = lse([a, 0]), LB = lse([b, 0]), loss = LA + LB
    dL/ds_i = -exp(a_i - LA) + exp(b_i - LB)
Excluded entries take no part (selects, never 1e12 arithmetic). Rows run in parallel.

Each stream keeps (m, l) with lse = m + log l, started at (0, 1): the appended zero logit. A row is
streamed in chunks that stay in L1, and a chunk adds sum(exp(a_i - m)) = sum(t_i exp(-s_i - m)) with
the m it already has: no max pass (float max reductions do not vectorise here) and no logarithm.
That is exact unless a term overflows, which shows as an inf (or NaN) chunk sum; then the chunk is
redone with its true maximum and log t_i (scalar, rare: logits beyond ~88 above the running lse or
targets below ~1e-38). Terms that underflow are below e^-87 of l >= 1 and cannot matter. l is folded
into m when it grows large. The backward uses the same identity and the same inf check per chunk.
"""
import math

import numba
import numpy as np
import torch
from numba import njit, prange

from .. import _buffers
from ._math import FASTMATH, JIT_OPTIONS, fast_exp, like
from ._tensors import compute_view

CHUNK = 1024
_JIT = dict(JIT_OPTIONS, cache=True)


@njit(inline="always", **_JIT)
def _entry(s, t, mask, j):
    """(s_j, t_j, in pos stream, in neg stream, valid) with t_j in the compute dtype."""
    x = s[j]
    tj = like(s, t[j])
    valid = x != like(s, -np.inf)
    if mask is not None:
        valid = valid & (mask[j] != 0)
    return x, tj, valid & (tj > like(s, 0.0)), valid & (tj < like(s, 1.0)), valid


@njit(inline="always", **_JIT)
def _part(array, lo, hi):
    """array[lo:hi], or None for None."""
    if array is None:
        return None
    return array[lo:hi]


@njit(**_JIT)
def _chunk_sums(s, t, mask, m_pos, m_neg):
    """Sums of exp(a - m_pos) and exp(b - m_neg) over a chunk (views indexed from 0, so numba's
    negative-index check folds away and the loop vectorises), and the count of targets outside
    [0, 1] (NaN included)."""
    zero = like(s, 0.0)
    one = like(s, 1.0)
    sum_pos = zero
    sum_neg = zero
    n_bad = zero  # counted in the compute dtype: an int64 counter halves the vector width
    for j in range(s.shape[0]):
        x, tj, pos, neg, _ = _entry(s, t, mask, j)
        sum_pos += tj * fast_exp(-x - m_pos) if pos else zero
        sum_neg += (one - tj) * fast_exp(x - m_neg) if neg else zero
        n_bad += zero if (tj >= zero) & (tj <= one) else one
    return sum_pos, sum_neg, n_bad


@njit(**_JIT)
def _add_chunk_exactly(s, t, mask, lo, hi, m_pos, l_pos, m_neg, l_neg):
    """The overflow path: move m to the chunk's true maximum, then add its terms. A +inf logit in
    the negative stream makes m = +inf: its terms count 1 (not exp(inf - inf) = NaN), so LB = +inf."""
    one = like(s, 1.0)
    for j in range(lo, hi):
        x, tj, pos, neg, _ = _entry(s, t, mask, j)
        if pos:
            a = -x + like(s, math.log(tj))
            if a > m_pos:
                l_pos *= fast_exp(m_pos - a)
                m_pos = a
            l_pos += one if a == m_pos else fast_exp(a - m_pos)
        if neg:
            b = x + like(s, math.log1p(-tj))
            if b > m_neg:
                l_neg *= fast_exp(m_neg - b)
                m_neg = b
            l_neg += one if b == m_neg else fast_exp(b - m_neg)
    return m_pos, l_pos, m_neg, l_neg


@njit(**_JIT)
def _forward_row(s, t, mask):
    """(LA, LB, number of targets outside [0, 1]) for one row."""
    inf = like(s, np.inf)
    big = like(s, 2.0**60)
    m_pos = like(s, 0.0)
    l_pos = like(s, 1.0)
    m_neg = like(s, 0.0)
    l_neg = like(s, 1.0)
    n_bad = 0
    for lo in range(0, s.shape[0], CHUNK):
        hi = min(lo + CHUNK, s.shape[0])
        sum_pos, sum_neg, bad = _chunk_sums(s[lo:hi], t[lo:hi], _part(mask, lo, hi), m_pos, m_neg)
        n_bad += int(bad)
        if (sum_pos < inf) & (sum_neg < inf):
            l_pos += sum_pos
            l_neg += sum_neg
        else:
            m_pos, l_pos, m_neg, l_neg = _add_chunk_exactly(s, t, mask, lo, hi, m_pos, l_pos, m_neg, l_neg)
        if l_pos > big:
            m_pos += like(s, math.log(l_pos))
            l_pos = like(s, 1.0)
        if l_neg > big:
            m_neg += like(s, math.log(l_neg))
            l_neg = like(s, 1.0)
    return m_pos + math.log(l_pos), m_neg + math.log(l_neg), n_bad


@njit(parallel=True, **_JIT)
def _forward(logits, targets, mask, loss, lse):
    n_bad = 0
    mask_step = 0 if mask is None or mask.shape[0] == 1 else 1  # a [1, C] mask is shared by all rows
    for i in prange(logits.shape[0]):
        if mask is None:
            la, lb, bad = _forward_row(logits[i], targets[i], None)
        else:
            la, lb, bad = _forward_row(logits[i], targets[i], mask[i * mask_step])
        lse[i, 0] = la
        lse[i, 1] = lb
        loss[i] = la + lb
        n_bad += bad
    return n_bad


# Above this LA or LB the backward takes the logs of the weights: the forward's overflow path
# rounded a = -s + log t (b = s + log(1 - t)) to float32 there, and exp(b - LB) has to use that b
# for the dominant terms to sum to 1 (t exp(-s - LA) would be off by up to LA x 2^-24, relative).
LOG_DOMAIN_ABOVE = 64.0


@njit(**dict(_JIT, fastmath=FASTMATH - {"reassoc"}))
def _add_then_shift(x, log_weight, lse):
    """(x + log_weight) - lse, rounded in that order as the forward rounded x + log_weight (numba
    inlines this at the LLVM level, where the caller's reassociation cannot reach it)."""
    return (x + log_weight) - lse


@njit(**_JIT)
def _backward_chunk(s, t, mask, la, lb, g, grad_s, grad_t):
    """One chunk of the backward (views indexed from 0, see _chunk_sums)."""
    zero = like(s, 0.0)
    one = like(s, 1.0)
    # exp(a - LA) = t exp(-s - LA) overflows only for targets below ~1e-38: checked per chunk
    total = like(s, np.inf)
    if (la <= LOG_DOMAIN_ABOVE) & (lb <= LOG_DOMAIN_ABOVE):
        total = zero
        for j in range(s.shape[0]):
            x, tj, pos, neg, _ = _entry(s, t, mask, j)
            d = (one - tj) * fast_exp(x - lb) if neg else zero
            d -= tj * fast_exp(-x - la) if pos else zero
            grad_s[j] = g * d
            total += d
    if not (abs(total) < like(s, np.inf)):
        for j in range(s.shape[0]):
            x, tj, pos, neg, _ = _entry(s, t, mask, j)
            d = fast_exp(_add_then_shift(x, like(s, math.log1p(-tj)), lb)) if neg else zero
            if pos:
                d -= fast_exp(_add_then_shift(-x, like(s, math.log(tj)), la))
            grad_s[j] = g * d
    if grad_t is not None:
        # dL/dt_j = exp(-s_j - LA) - exp(s_j - LB), one-sided at t = 0 and 1 (spec section 5)
        for j in range(s.shape[0]):
            x, _, _, _, valid = _entry(s, t, mask, j)
            grad_t[j] = g * (fast_exp(-x - la) - fast_exp(x - lb)) if valid else zero


@njit(**_JIT)
def _backward_row(s, t, mask, la, lb, g, grad_s, grad_t):
    for lo in range(0, s.shape[0], CHUNK):
        hi = min(lo + CHUNK, s.shape[0])
        _backward_chunk(s[lo:hi], t[lo:hi], _part(mask, lo, hi), la, lb, g, grad_s[lo:hi], _part(grad_t, lo, hi))


@njit(parallel=True, **_JIT)
def _backward(logits, targets, mask, lse, grad_loss, grad_logits, grad_targets):
    mask_step = 0 if mask is None or mask.shape[0] == 1 else 1
    for i in prange(logits.shape[0]):
        g = like(logits, grad_loss[i])
        if mask is None:
            m = None
        else:
            m = mask[i * mask_step]
        if grad_targets is None:
            _backward_row(logits[i], targets[i], m, lse[i, 0], lse[i, 1], g, grad_logits[i], None)
        else:
            _backward_row(logits[i], targets[i], m, lse[i, 0], lse[i, 1], g, grad_logits[i], grad_targets[i])


# ---- launch functions: 2-D contiguous CPU tensors in, tensors out --------------------------------


def _array(x):
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.detach().numpy()


def zlpr_forward(logits, targets, mask):
    """logits, targets [N, C]; mask [N or 1, C] bool or None.
    Returns (loss [N], lse [N, 2], number of targets outside [0, 1]); float32, or float64 for
    float64 logits."""
    work = compute_view(logits)
    loss = torch.empty(work.shape[0], dtype=work.dtype)
    lse = torch.empty(work.shape[0], 2, dtype=work.dtype)
    n_bad = _forward(_array(work), _array(targets), None if mask is None else _array(mask),
                     loss.numpy(), lse.numpy())
    return loss, lse, n_bad


def zlpr_backward(logits, targets, mask, lse, grad_loss, need_grad_targets):
    """grad_loss [N]. Returns (grad_logits in logits.dtype, grad_targets in targets.dtype or None)."""
    work = compute_view(logits)
    grad_logits = _buffers.empty("zlpr.grad_logits", work.shape, work.dtype)
    grad_targets = torch.empty_like(work) if need_grad_targets else None
    _backward(_array(work), _array(targets), None if mask is None else _array(mask), lse.numpy(),
              _array(grad_loss.to(work.dtype).contiguous()), grad_logits.numpy(),
              None if grad_targets is None else grad_targets.numpy())
    if grad_targets is not None:
        grad_targets = grad_targets.to(targets.dtype)
    return grad_logits.to(logits.dtype), grad_targets


# ---- sparse positives and the fused-linear chunk epilogue -----------------------------------------
# Positives given as indices [N, K] (-1 = padding) become a {0, 1} membership row in a per-thread
# scratch buffer, so both streams run through the dense row code above: the negative sum is taken
# directly over the non-members (never "all minus positives", which cancels catastrophically).


@njit(**_JIT)
def _mark(member, indices, value):
    for k in range(indices.shape[0]):
        if indices[k] >= 0:
            member[indices[k]] = value


@njit(**_JIT)
def _row_loss(s, t, g, need_grad, scratch, given, la, lb):
    """(LA, LB, bad targets) of one row; with need_grad, s is overwritten by g dL/ds (a chunk at a
    time: each chunk is copied to scratch first, so the overflow path can reread it). With given,
    the row's (LA, LB) are la, lb (combined over label shards) and the forward pass is skipped."""
    n_bad = 0
    if not given:
        la, lb, n_bad = _forward_row(s, t, None)
    if need_grad:
        for lo in range(0, s.shape[0], CHUNK):
            hi = min(lo + CHUNK, s.shape[0])
            saved = scratch[:hi - lo]
            saved[:] = s[lo:hi]
            _backward_chunk(saved, t[lo:hi], None, la, lb, g, s[lo:hi], None)
    return la, lb, n_bad


@njit(**_JIT)
def _indexed_row_loss(logits, targets, pos_index, i, g, need_grad, member, scratch, given, la, lb):
    """_row_loss of row i, its targets dense or, with an empty targets array, from the index list."""
    if targets.shape[0] == 0:
        _mark(member, pos_index[i], 1)
        result = _row_loss(logits[i], member, g, need_grad, scratch, given, la, lb)
        _mark(member, pos_index[i], 0)
        return result
    return _row_loss(logits[i], targets[i], g, need_grad, scratch, given, la, lb)


@njit(parallel=True, **_JIT)
def _loss_rows(logits, targets, pos_index, row_scale, need_grad, n_blocks, loss, lse, given_lse):
    """Per-row loss and (LA, LB) of logits [R, C] with dense targets [R, C], or with positive indices
    [R, K] when targets is empty. With need_grad, logits is overwritten by row_scale[i] dL/ds.
    With given_lse, (LA, LB) are read from lse instead of computed. Rows go round-robin to n_blocks
    blocks, each with its own scratch rows."""
    n_rows, n_cols = logits.shape
    n_bad = 0
    for block in prange(n_blocks):
        member = np.zeros(n_cols if targets.shape[0] == 0 else 1, np.uint8)
        scratch = np.empty(CHUNK, logits.dtype)
        for i in range(block, n_rows, n_blocks):
            la, lb, bad = _indexed_row_loss(logits, targets, pos_index, i, like(logits, row_scale[i]), need_grad,
                                            member, scratch, given_lse, lse[i, 0], lse[i, 1])
            lse[i, 0] = la
            lse[i, 1] = lb
            loss[i] = la + lb
            n_bad += bad
    return n_bad


@njit(parallel=True, **_JIT)
def _sparse_backward(logits, pos_index, lse, grad_loss, n_blocks, grad_logits):
    n_rows, n_cols = logits.shape
    for block in prange(n_blocks):
        member = np.zeros(n_cols, np.uint8)
        for i in range(block, n_rows, n_blocks):
            _mark(member, pos_index[i], 1)
            _backward_row(logits[i], member, None, lse[i, 0], lse[i, 1], like(logits, grad_loss[i]),
                          grad_logits[i], None)
            _mark(member, pos_index[i], 0)


def _n_blocks(n_rows):
    return max(1, min(n_rows, 4 * numba.get_num_threads()))


_NO_TARGETS = np.zeros((0, 1), np.uint8)
_NO_INDEX = np.zeros((0, 1), np.int64)


def sparse_forward(logits, pos_index):
    """logits [N, C], pos_index [N, K] int64 (validated: in [-1, C), no duplicates).
    Returns (loss [N], lse [N, 2]) in float32, or float64 for float64 logits."""
    work = compute_view(logits)
    loss = torch.empty(work.shape[0], dtype=work.dtype)
    lse = torch.empty(work.shape[0], 2, dtype=work.dtype)
    _loss_rows(_array(work), _NO_TARGETS, pos_index.numpy(), np.zeros(work.shape[0], _array(work).dtype), False,
               _n_blocks(work.shape[0]), loss.numpy(), lse.numpy(), False)
    return loss, lse


def sparse_backward(logits, pos_index, lse, grad_loss):
    """Returns grad_logits [N, C] in logits.dtype."""
    work = compute_view(logits)
    grad_logits = _buffers.empty("zlpr.sparse_grad_logits", work.shape, work.dtype)
    _sparse_backward(_array(work), pos_index.numpy(), lse.numpy(), _array(grad_loss.to(work.dtype).contiguous()),
                     _n_blocks(work.shape[0]), grad_logits.numpy())
    return grad_logits.to(logits.dtype)


def chunk_loss_and_grad(logits, targets, pos_index, row_scale, need_grad, lse=None):
    """The fused-linear epilogue for one chunk of rows. logits [R, C] float32/float64, contiguous and
    owned by the caller; targets [R, C] or pos_index [R, K] (the other None); row_scale [R].
    lse: optional [R, 2] (LA, LB) of the rows, known beforehand (the label-parallel head combines
    them over the label shards): the kernel uses them instead of this chunk's own and skips its
    forward pass (the bad-target count is then 0: the pass that made lse counted them).
    Returns (loss [R], lse [R, 2], bad-target count); with need_grad, logits now holds
    row_scale[i] dL/dlogits."""
    loss = torch.empty(logits.shape[0], dtype=logits.dtype)
    given = lse is not None
    lse = lse.to(logits.dtype).contiguous() if given else torch.empty(logits.shape[0], 2, dtype=logits.dtype)
    n_bad = _loss_rows(logits.numpy(), _NO_TARGETS if targets is None else _array(targets),
                       _NO_INDEX if pos_index is None else pos_index.numpy(),
                       _array(row_scale.to(logits.dtype).contiguous()), need_grad, _n_blocks(logits.shape[0]),
                       loss.numpy(), lse.numpy(), given)
    return loss, lse, n_bad
