"""Amos optimiser step on the CPU (docs/amos.md): one fused pass per tensor.

A tensor is viewed as [outer, reduced, inner] with one slot per (outer, inner) pair. Per slot the
kernel sums the clipped g^2 over the reduced axis, updates v and b, and turns them into two
coefficients, decay = delta (gamma/2 + l2) and scale = delta lr eta sqrt(r); then it applies
theta <- theta - decay theta - scale g (through the momentum EMA when there is one).

    rows  (inner == 1: slots per row of a row-major [slots, reduced] view; scalar and full slots too):
          one parallel task per block of rows reduces a row and applies it while it is still in
          cache, so theta and g cross memory once. A few long rows (a scalar slot over a big tensor)
          are split instead: partial sums per chunk, the slot update, then the apply per chunk.
    cols  (inner > 1: slots per column of [reduced, inner], e.g. a (1, out) slot): one parallel task
          per strip of columns reduces down the strip and then applies it; the rows of a strip are
          contiguous runs, so both passes stream.

Math in the array dtype (float32, or float64 for the accuracy path); hp holds the hyper-parameters
in that dtype (see HP_FIELDS). No temporaries the size of a tensor.

Large gradients: a square overflows above ~1.8e19 in float32 (1.3e154 in float64). A slot whose plain
sum of squares comes out inf is summed again as (g / unit)^2 with unit its largest |g|, and its v
and epsilon guard are carried in units of unit^2 (_slot_update); v is stored saturated at the
dtype's largest value. The common path is unchanged: one comparison per slot (full slots: entries
whose square overflows are skipped and redone after their chunk).
"""
import numba
import numpy as np
import torch
from numba import njit, prange

from ._math import FASTMATH, JIT_OPTIONS, like

_JIT = dict(JIT_OPTIONS, cache=True)
# 1 - beta and 1 - momentum come from the host in float64: in float32 they cancel (1 - 0.999f loses
# 1e-5 relative)
HP_FIELDS = ("lr", "lr_eta", "sqrt_lr", "sqrt_lr_eta", "beta", "one_minus_beta", "bias_correction", "c_coef",
             "d_coef", "extra_l2", "epsilon", "clip", "momentum", "one_minus_momentum", "max")
(_LR, _LR_ETA, _SQRT_LR, _SQRT_LR_ETA, _BETA, _BETA1, _BIAS, _C, _D, _L2, _EPS, _CLIP, _MU, _MU1,
 _MAX) = range(len(HP_FIELDS))
SPLIT_CHUNK = 65536         # chunk of a long row when there are too few rows to share out
COL_STRIP = 64              # columns per parallel task in the cols kernel


@njit(inline="always", **_JIT)
def _clipped(x, clip):
    return min(max(x, -clip), clip)


def _slot_update_py(sum_sq, count, unit, v, b, hp):
    """(new v, new b, decay, scale) of one slot from the sum of (clipped g / unit)^2 over `count`
    entries: unit is 1, or the slot's largest |g| where the plain squares overflow."""
    one = like(hp, 1.0)
    g2 = sum_sq / like(hp, count)                          # mean g^2 / unit^2
    u = hp[_BETA] * (v / unit / unit) + hp[_BETA1] * g2    # new v / unit^2
    guarded = max(u, hp[_EPS] / unit / unit)               # max(new v, epsilon) / unit^2
    # r = bias / (guarded unit^2): gamma takes r g^2, the step sqrt(r) g
    gamma = hp[_LR] * hp[_LR] * hp[_BIAS] * (g2 / guarded) / np.sqrt(one + hp[_C] * hp[_SQRT_LR] * b)
    delta = one / (one + hp[_D] * hp[_SQRT_LR_ETA] * b)
    decay = delta * (gamma * like(hp, 0.5) + hp[_L2])
    scale = delta * hp[_LR_ETA] * np.sqrt(hp[_BIAS] / guarded) / unit
    v_new = u * unit * unit
    return hp[_MAX] if v_new > hp[_MAX] else v_new, b + gamma * (one + b), decay, scale


# With a unit of 1 (the common path) the update is inlined into the kernels; with a larger unit it
# runs in a pass of its own after them, compiled without fast-math: reassociated, u * unit * unit
# would form unit^2, which overflows. Full slots run it per entry in a kernel without 'reassoc'
# (there are no reductions there to vectorise), which keeps its written order.
_EXACT = dict(_JIT, fastmath=False)
_NO_REASSOC = dict(_JIT, fastmath=FASTMATH - {"reassoc"})
_slot_update = njit(inline="always", **_JIT)(_slot_update_py)
_slot_update_scaled = njit(**_EXACT)(_slot_update_py)


@njit(inline="always", **_JIT)
def _apply(theta, g, m, decay, scale, hp):
    """theta += D (or the momentum EMA of D) for one slot's coefficients. The arguments are views
    indexed from 0: numba's negative-index check folds away and the loop vectorises."""
    clip = hp[_CLIP]
    if m is None:
        for k in range(theta.shape[0]):
            t = theta[k]
            theta[k] = t - decay * t - scale * _clipped(g[k], clip)
    else:
        mu, mu1 = hp[_MU], hp[_MU1]
        for k in range(theta.shape[0]):
            t = theta[k]
            mk = mu * m[k] + mu1 * (-decay * t - scale * _clipped(g[k], clip))
            m[k] = mk
            theta[k] = t + mk


@njit(inline="always", **_JIT)
def _sum_sq(g, clip):
    acc = like(g, 0.0)
    for k in range(g.shape[0]):
        x = _clipped(g[k], clip)
        acc += x * x
    return acc


@njit(**_EXACT)
def _rescaled_sum_sq(g, clip):
    """(sum of (clipped g / unit)^2, unit) with unit the largest |clipped g|, at least 1 (a smaller
    unit would overflow v / unit^2): for slots whose plain sum of squares overflowed (rare: not
    inlined, and divided as written: 1 / unit can be subnormal)."""
    unit = like(g, 1.0)
    for k in range(g.shape[0]):
        unit = max(unit, abs(_clipped(g[k], clip)))
    acc = like(g, 0.0)
    for k in range(g.shape[0]):
        x = _clipped(g[k], clip) / unit
        acc += x * x
    return acc, unit


@njit(inline="always", **_JIT)
def _part(array, lo, hi, step=1):
    """array[lo:hi:step], or None for None."""
    if array is None:
        return None
    return array[lo:hi:step]


@njit(**_EXACT)
def _redo_skipped(theta, g, m, v, b, reduced, inner, hp, skipped):
    """The slots a kernel skipped because their plain sum of squares overflowed: summed again as
    (g / unit)^2 with unit their largest |g|, updated in units of unit^2, and applied (rare)."""
    for slot in range(skipped.shape[0]):
        if skipped[slot]:
            start = (slot // inner) * reduced * inner + slot % inner
            stop = start + reduced * inner
            gs = g[start:stop:inner]
            sum_sq, unit = _rescaled_sum_sq(gs, hp[_CLIP])
            v[slot], b[slot], decay, scale = _slot_update_scaled(sum_sq, reduced, unit, v[slot], b[slot], hp)
            _apply(theta[start:stop:inner], gs, _part(m, start, stop, inner), decay, scale, hp)


def _rows_step(theta, g, m, v, b, n_cols, hp, skipped):
    """Flat contiguous theta, g (and m) of n_slots * n_cols entries; v, b, skipped [n_slots]. A slot
    whose sum of squares overflows is left as it is and flagged in skipped (_redo_skipped)."""
    one = like(hp, 1.0)
    for s in prange(v.shape[0]):
        lo = s * n_cols
        hi = lo + n_cols
        gs = g[lo:hi]
        sum_sq = _sum_sq(gs, hp[_CLIP])
        over = sum_sq > hp[_MAX]
        skipped[s] = over
        v_new, b_new, decay, scale = _slot_update(sum_sq, n_cols, one, v[s], b[s], hp)
        # selects, not a branch around the apply (which halves the speed of narrow rows)
        v[s] = v[s] if over else v_new
        b[s] = b[s] if over else b_new
        end = lo if over else hi
        _apply(theta[lo:end], gs, _part(m, lo, end), decay, scale, hp)


@njit(inline="always", **_JIT)
def _full_entry(t, x, m, decay, scale, hp):
    """(theta, m) after the step of one entry with its own slot."""
    d = -decay * t - scale * x
    if m is not None:
        d = hp[_MU] * m + hp[_MU1] * d
        return t + d, d
    return t + d, m


@njit(inline="always", **_JIT)
def _full_chunk(theta, g, m, v, b, hp):
    """One slot per entry: the slot update and the apply fused per element (views from 0). Entries
    whose square overflows keep their values here; returns whether there were any."""
    clip = hp[_CLIP]
    one = like(hp, 1.0)
    overflow = False
    for k in range(theta.shape[0]):
        x = _clipped(g[k], clip)
        over = x * x > hp[_MAX]
        overflow |= over
        v_new, b_new, decay, scale = _slot_update(x * x, 1, one, v[k], b[k], hp)
        t = theta[k]
        if m is None:
            t_new, m_new = _full_entry(t, x, None, decay, scale, hp)
        else:
            t_new, m_new = _full_entry(t, x, m[k], decay, scale, hp)
            m[k] = m[k] if over else m_new
        v[k] = v[k] if over else v_new
        b[k] = b[k] if over else b_new
        theta[k] = t if over else t_new
    return overflow


@njit(**_JIT)
def _full_overflow(theta, g, m, v, b, hp):
    """The entries of a chunk whose square overflows: (x / |x|)^2 = 1 in units of x^2 (rare)."""
    for k in range(theta.shape[0]):
        x = _clipped(g[k], hp[_CLIP])
        if x * x > hp[_MAX]:
            v[k], b[k], decay, scale = _slot_update_scaled(like(hp, 1.0), 1, abs(x), v[k], b[k], hp)
            if m is None:
                theta[k], _ = _full_entry(theta[k], x, None, decay, scale, hp)
            else:
                theta[k], m[k] = _full_entry(theta[k], x, m[k], decay, scale, hp)


def _full_step(theta, g, m, v, b, hp):
    """One slot per entry (no reduction): all arrays flat, of one length."""
    n = theta.shape[0]
    for chunk in prange((n + SPLIT_CHUNK - 1) // SPLIT_CHUNK):
        lo = chunk * SPLIT_CHUNK
        hi = min(n, lo + SPLIT_CHUNK)
        if _full_chunk(theta[lo:hi], g[lo:hi], _part(m, lo, hi), v[lo:hi], b[lo:hi], hp):
            _full_overflow(theta[lo:hi], g[lo:hi], _part(m, lo, hi), v[lo:hi], b[lo:hi], hp)


@njit(parallel=True, **_JIT)
def _split_sums(g, n_slots, n_cols, n_chunks, clip, partial):
    for task in prange(n_slots * n_chunks):
        s, c = task // n_chunks, task % n_chunks
        lo = s * n_cols + c * SPLIT_CHUNK
        partial[s, c] = _sum_sq(g[lo:min(lo + SPLIT_CHUNK, (s + 1) * n_cols)], clip)


@njit(parallel=True, **_JIT)
def _split_apply(theta, g, m, n_cols, n_chunks, decay, scale, hp):
    n_slots = decay.shape[0]
    for task in prange(n_slots * n_chunks):
        s, c = task // n_chunks, task % n_chunks
        lo = s * n_cols + c * SPLIT_CHUNK
        hi = min(lo + SPLIT_CHUNK, (s + 1) * n_cols)
        _apply(theta[lo:hi], g[lo:hi], _part(m, lo, hi), decay[s], scale[s], hp)


@njit(**_JIT)
def _split_slots(g, partial, n_cols, v, b, hp, decay, scale):
    for s in range(v.shape[0]):
        # the chunk sums are added in a fixed order: deterministic
        sum_sq, unit = partial[s].sum(), like(hp, 1.0)
        if sum_sq > hp[_MAX]:  # a few slots, serial: rescaled here
            sum_sq, unit = _rescaled_sum_sq(g[s * n_cols:(s + 1) * n_cols], hp[_CLIP])
        v[s], b[s], decay[s], scale[s] = _slot_update_scaled(sum_sq, n_cols, unit, v[s], b[s], hp)


@njit(inline="always", **_JIT)
def _apply_strip_row(theta, g, m, decay, scale, hp):
    """One row of a column strip, with per-column coefficients (views from 0)."""
    clip = hp[_CLIP]
    for j in range(theta.shape[0]):
        t = theta[j]
        d = -decay[j] * t - scale[j] * _clipped(g[j], clip)
        if m is not None:
            d = hp[_MU] * m[j] + hp[_MU1] * d
            m[j] = d
        theta[j] = t + d


def _cols_step(theta, g, m, v, b, n_rows, hp, skipped):
    """Flat contiguous theta, g (and m) of n_rows * n_slots entries, row-major; v, b, skipped
    [n_slots]. A strip with a slot whose sum of squares overflows is left as it is and its slots are
    flagged in skipped (_redo_skipped)."""
    n_slots = v.shape[0]
    clip = hp[_CLIP]
    for strip in prange((n_slots + COL_STRIP - 1) // COL_STRIP):
        lo = strip * COL_STRIP
        width = min(COL_STRIP, n_slots - lo)
        acc = np.zeros(width, dtype=v.dtype)
        for i in range(n_rows):
            gr = g[i * n_slots + lo:i * n_slots + lo + width]
            for j in range(width):
                x = _clipped(gr[j], clip)
                acc[j] += x * x
        over = False
        for j in range(width):
            over |= acc[j] > hp[_MAX]
        decay = np.empty(width, dtype=v.dtype)
        scale = np.empty(width, dtype=v.dtype)
        for j in range(width):
            skipped[lo + j] = over
            v_new, b_new, decay[j], scale[j] = _slot_update(acc[j], n_rows, like(hp, 1.0), v[lo + j], b[lo + j], hp)
            v[lo + j] = v[lo + j] if over else v_new
            b[lo + j] = b[lo + j] if over else b_new
        for i in range(0 if over else n_rows):
            start = i * n_slots + lo
            _apply_strip_row(theta[start:start + width], g[start:start + width], _part(m, start, start + width),
                             decay, scale, hp)


# Each whole-tensor kernel in two builds: threads for big tensors, one thread for small ones, where
# waking the thread pool costs more than the work (milliseconds on a loaded machine).
PARALLEL_MIN_ELEMENTS = 1 << 16
rows_step, rows_step_serial = njit(parallel=True, **_JIT)(_rows_step), njit(**_JIT)(_rows_step)
full_step, full_step_serial = njit(parallel=True, **_NO_REASSOC)(_full_step), njit(**_NO_REASSOC)(_full_step)
cols_step, cols_step_serial = njit(parallel=True, **_JIT)(_cols_step), njit(**_JIT)(_cols_step)


def _split_rows_step(theta, g, m, v, b, n_cols, hp):
    n_chunks = -(-n_cols // SPLIT_CHUNK)
    partial = np.empty((v.shape[0], n_chunks), dtype=v.dtype)
    _split_sums(g, v.shape[0], n_cols, n_chunks, hp[_CLIP], partial)
    decay = np.empty_like(v)
    scale = np.empty_like(v)
    _split_slots(g, partial, n_cols, v, b, hp, decay, scale)
    _split_apply(theta, g, m, n_cols, n_chunks, decay, scale, hp)


def amos_step(theta, g, m, v, b, layout, hp):
    """One Amos step on one tensor, in place. theta, g, m (or None): flat contiguous numpy arrays of
    one dtype; v, b: flat slot arrays; layout (outer, reduced, inner); hp: numpy array (HP_FIELDS)."""
    outer, reduced, inner = layout
    parallel = theta.shape[0] >= PARALLEL_MIN_ELEMENTS
    if reduced == 1:
        (full_step if parallel else full_step_serial)(theta, g, m, v, b, hp)
        return
    if inner == 1 and parallel and outer < 4 * numba.get_num_threads():  # a few long rows: split them
        _split_rows_step(theta, g, m, v, b, reduced, hp)
        return
    skipped = np.empty(outer * inner, dtype=np.bool_)
    if inner > 1:
        size = reduced * inner
        cols = cols_step if parallel and inner > COL_STRIP else cols_step_serial
        for o in range(outer):
            part = slice(o * size, (o + 1) * size)
            slots = slice(o * inner, (o + 1) * inner)
            cols(theta[part], g[part], None if m is None else m[part], v[slots], b[slots], reduced, hp, skipped[slots])
    else:
        (rows_step if parallel else rows_step_serial)(theta, g, m, v, b, reduced, hp, skipped)
    if skipped.any():
        _redo_skipped(theta, g, m, v, b, reduced, inner, hp, skipped)


def _flat_numpy(t):
    return t.detach().reshape(-1).numpy()


def amos_step_tensor(param, grad, m, v, b, step, layout, hyper):
    """Torch-side launcher: one Amos step on `param` in place (float32 or float64, CPU), its slots
    v, b (and m) of the same dtype as the math; step is the already incremented count tensor."""
    dtype = v.dtype
    t = float(step)
    lr, eta, beta = hyper["lr"], hyper["eta"], hyper["beta"]
    clip = hyper["clip_value"]
    mu = 0.0 if hyper["momentum"] is None else hyper["momentum"]
    hp = np.array([lr, lr * eta, lr ** 0.5, (lr * eta) ** 0.5, beta, 1 - beta, 1 - beta ** t,
                   hyper["c_coef"], hyper["d_coef"], hyper["extra_l2"], hyper["epsilon"],
                   np.inf if clip is None else clip, mu, 1 - mu, torch.finfo(dtype).max],
                  dtype=np.float32 if dtype == torch.float32 else np.float64)
    in_place = param.is_contiguous() and param.dtype == dtype
    work = param.detach() if in_place else param.detach().to(dtype).contiguous()
    grad = grad.to(dtype).contiguous()
    amos_step(_flat_numpy(work), _flat_numpy(grad), None if m is None else _flat_numpy(m),
              _flat_numpy(v), _flat_numpy(b), layout, hp)
    if not in_place:
        param.copy_(work)


def unsupported(dtype):
    """Why these kernels cannot step parameters of `dtype`, or None."""
    return None if dtype in (torch.float32, torch.float64) else "numba takes float32/float64 parameters"


def amos_step_tensors(items, hyper):
    """One Amos step for a parameter group: items are (param, grad, m or None, v, b, step, layout,
    eta); hyper the group's settings. One fused pass per tensor (a numba call costs ~1 us)."""
    for param, grad, m, v, b, step, layout, eta in items:
        amos_step_tensor(param, grad, m, v, b, step, layout, dict(hyper, eta=eta))
