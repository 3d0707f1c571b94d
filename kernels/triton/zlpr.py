"""ZLPR (multi-label softmax cross-entropy) on the GPU. Math: docs/zlpr.md.

forward: grid (rows, splits). Each program streams its slice of the classes in BLOCK tiles with an
online logsumexp per stream (pos a = -s + log t, neg b = s + log(1 - t)). All partial states use the
reference point m = 0; split 0 starts at l = 1 (the appended zero logit, added exactly once), the
others at l = 0, so no state is ever -inf and exp(-inf - -inf) cannot occur. A combine kernel merges
the splits per row into (LA, LB) and the loss. Splitting C keeps the GPU busy when rows are few.
backward: grid (rows, column tiles), one elementwise pass: g (exp(b - LB) - exp(a - LA)).
Targets outside [0, 1] make the row's loss NaN and are counted (the caller raises on CPU).
"""
import torch
import triton
import triton.language as tl

FORWARD_BLOCK = 2048
BACKWARD_BLOCK = 1024
SPARSE_BLOCK = 1024  # [BLOCK, INDEX_BLOCK] membership compare per tile
NUM_WARPS = 8
_PARTIAL = 5  # per (row, split): m_pos, l_pos, m_neg, l_neg, bad-target count


@triton.jit
def _online_logsumexp(m, l, x):
    """One tile of a running logsumexp: (max, sum of exp(x - max)) updated with the block x. Terms
    equal to the max count 1, so +inf logits give lse = +inf (exp(inf - inf) would be NaN)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    rescale = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    return m_new, l * rescale + tl.sum(tl.where(x == m_new, 1.0, tl.exp(x - m_new)), axis=0)


@triton.jit
def _store_partial(out, m_pos, l_pos, m_neg, l_neg, n_bad):
    """A split's partial (m, l) of both streams and its count of bad targets, for the combine kernel."""
    tl.store(out + 0, m_pos)
    tl.store(out + 1, l_pos)
    tl.store(out + 2, m_neg)
    tl.store(out + 3, l_neg)
    tl.store(out + 4, n_bad)


@triton.jit
def _load_row_tile(logits_ptr, targets_ptr, mask_ptr, row, cols, n_cols,
                   logits_stride, targets_stride, mask_stride, HAS_MASK: tl.constexpr):
    """(s, t, valid, a, b, in_bounds) for one tile of one row, in float32."""
    inb = cols < n_cols
    s = tl.load(logits_ptr + row * logits_stride + cols, mask=inb, other=0.0).to(tl.float32)
    t = tl.load(targets_ptr + row * targets_stride + cols, mask=inb, other=0).to(tl.float32)
    valid = inb & (s != float("-inf"))
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + row * mask_stride + cols, mask=inb, other=0) != 0)
    a = tl.where(valid & (t > 0.0), -s + tl.log(t), float("-inf"))
    b = tl.where(valid & (t < 1.0), s + tl.log(1.0 - t), float("-inf"))
    return s, t, valid, a, b, inb


@triton.jit
def zlpr_forward_kernel(logits_ptr, targets_ptr, mask_ptr, partial_ptr, n_cols, cols_per_split,
                        logits_stride, targets_stride, mask_stride,
                        HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    start = split * cols_per_split
    m_pos = 0.0
    m_neg = 0.0
    l_pos = (split == 0).to(tl.float32)
    l_neg = (split == 0).to(tl.float32)
    n_bad = 0.0
    for offset in range(0, cols_per_split, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        s, t, valid, a, b, inb = _load_row_tile(logits_ptr, targets_ptr, mask_ptr, row, cols, n_cols,
                                                logits_stride, targets_stride, mask_stride, HAS_MASK)
        n_bad += tl.sum((inb & ~((t >= 0.0) & (t <= 1.0))).to(tl.float32), axis=0)
        m_pos, l_pos = _online_logsumexp(m_pos, l_pos, a)
        m_neg, l_neg = _online_logsumexp(m_neg, l_neg, b)
    _store_partial(partial_ptr + (row * n_splits + split) * 5, m_pos, l_pos, m_neg, l_neg, n_bad)


@triton.jit
def zlpr_combine_kernel(partial_ptr, loss_ptr, lse_ptr, bad_ptr, n_splits, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SPLITS)
    ok = k < n_splits
    base = partial_ptr + (row * n_splits + k) * 5
    m_pos = tl.load(base + 0, mask=ok, other=0.0)
    l_pos = tl.load(base + 1, mask=ok, other=0.0)
    m_neg = tl.load(base + 2, mask=ok, other=0.0)
    l_neg = tl.load(base + 3, mask=ok, other=0.0)
    n_bad = tl.sum(tl.load(base + 4, mask=ok, other=0.0), axis=0)
    top = tl.max(m_pos, axis=0)
    lse_pos = top + tl.log(tl.sum(tl.where(m_pos == top, l_pos, l_pos * tl.exp(m_pos - top)), axis=0))
    top = tl.max(m_neg, axis=0)  # +inf when a split saw a +inf logit: see _online_logsumexp
    lse_neg = top + tl.log(tl.sum(tl.where(m_neg == top, l_neg, l_neg * tl.exp(m_neg - top)), axis=0))
    tl.store(lse_ptr + row * 2, lse_pos)
    tl.store(lse_ptr + row * 2 + 1, lse_neg)
    tl.store(loss_ptr + row, tl.where(n_bad > 0, float("nan"), lse_pos + lse_neg))
    tl.store(bad_ptr + row, n_bad)


@triton.jit
def zlpr_backward_kernel(logits_ptr, targets_ptr, mask_ptr, lse_ptr, grad_loss_ptr,
                         grad_logits_ptr, grad_targets_ptr, n_cols,
                         logits_stride, targets_stride, mask_stride,
                         HAS_MASK: tl.constexpr, NEED_GRAD_TARGETS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    s, t, valid, a, b, inb = _load_row_tile(logits_ptr, targets_ptr, mask_ptr, row, cols, n_cols,
                                            logits_stride, targets_stride, mask_stride, HAS_MASK)
    lse_pos = tl.load(lse_ptr + row * 2)
    lse_neg = tl.load(lse_ptr + row * 2 + 1)
    g = tl.load(grad_loss_ptr + row).to(tl.float32)
    grad = g * (tl.exp(b - lse_neg) - tl.exp(a - lse_pos))
    tl.store(grad_logits_ptr + row * n_cols + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=inb)
    if NEED_GRAD_TARGETS:
        # dL/dt = exp(-s - LA) - exp(s - LB), from s directly so t = 0 and 1 get the one-sided value
        grad_t = tl.where(valid, g * (tl.exp(-s - lse_pos) - tl.exp(s - lse_neg)), 0.0)
        tl.store(grad_targets_ptr + row * n_cols + cols, grad_t.to(grad_targets_ptr.dtype.element_ty), mask=inb)


# ---- launch -------------------------------------------------------------------------------------


def _block(n_cols, largest):
    return max(16, min(largest, triton.next_power_of_2(max(n_cols, 1))))


def _target_programs(device):
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: one program per row keeps the test cost down


def _as_loadable(x):
    return x.view(torch.uint8) if x.dtype == torch.bool else x


def _splits(n_rows, n_cols, block, device, n_splits=None):
    """(number of splits of C, columns per split): splits fill the GPU when rows are few."""
    n_tiles = triton.cdiv(n_cols, block)
    if n_splits is None:
        n_splits = min(n_tiles, max(1, triton.cdiv(_target_programs(device), max(n_rows, 1))))
    n_splits = max(1, min(n_splits, n_tiles))
    cols_per_split = triton.cdiv(n_tiles, n_splits) * block
    return (triton.cdiv(n_cols, cols_per_split) if n_cols else 1), cols_per_split


def zlpr_forward(logits, targets, mask, n_splits=None):
    """logits, targets [N, C] (row-contiguous); mask [N or 1, C] bool or None.
    Returns (loss [N] float32, lse [N, 2] float32, bad-target count per row [N] float32)."""
    n_rows, n_cols = logits.shape
    block = _block(n_cols, FORWARD_BLOCK)
    n_splits, cols_per_split = _splits(n_rows, n_cols, block, logits.device, n_splits)
    device = logits.device
    partial = torch.empty(n_rows, n_splits, _PARTIAL, dtype=torch.float32, device=device)
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    bad = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return loss, lse, bad.sum()
    mask_arg = _as_loadable(mask) if mask is not None else logits
    mask_stride = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    zlpr_forward_kernel[(n_rows, n_splits)](
        logits, _as_loadable(targets), mask_arg, partial, n_cols, cols_per_split,
        logits.stride(0), targets.stride(0), mask_stride,
        HAS_MASK=mask is not None, BLOCK=block, num_warps=NUM_WARPS)
    zlpr_combine_kernel[(n_rows,)](partial, loss, lse, bad, n_splits,
                                   SPLITS=max(2, triton.next_power_of_2(n_splits)), num_warps=1)
    return loss, lse, bad.sum()


def zlpr_backward(logits, targets, mask, lse, grad_loss, need_grad_targets, out=None):
    """Returns (grad_logits in logits.dtype, grad_targets in targets.dtype or None). grad_logits is
    written to `out` when given (which may be logits itself: each element is read before written)."""
    n_rows, n_cols = logits.shape
    grad_logits = torch.empty_like(logits) if out is None else out
    grad_targets = torch.empty(targets.shape, dtype=targets.dtype, device=targets.device) \
        if need_grad_targets else None
    if n_rows == 0 or n_cols == 0:
        if grad_targets is not None:
            grad_targets.zero_()
        return grad_logits.zero_(), grad_targets
    block = _block(n_cols, BACKWARD_BLOCK)
    mask_arg = _as_loadable(mask) if mask is not None else logits
    mask_stride = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    zlpr_backward_kernel[(n_rows, triton.cdiv(n_cols, block))](
        logits, _as_loadable(targets), mask_arg, lse, grad_loss.contiguous(),
        grad_logits, grad_logits if grad_targets is None else grad_targets, n_cols,
        logits.stride(0), targets.stride(0), mask_stride,
        HAS_MASK=mask is not None, NEED_GRAD_TARGETS=need_grad_targets, BLOCK=block,
        num_warps=NUM_WARPS)
    return grad_logits, grad_targets


# ---- sparse positives: membership tested in registers against the row's index list ---------------

INDEX_BLOCK = 16  # index-list entries compared per step


@triton.jit
def _sparse_row_tile(logits_ptr, index_ptr, row, cols, n_cols, n_index, logits_stride, index_stride,
                     INDEX_BLOCK: tl.constexpr):
    """(a, b, in_bounds) for one tile of one row with t = 1 on the listed classes, 0 elsewhere.
    The negative stream is the sum over the non-members directly (never all minus positives)."""
    inb = cols < n_cols
    s = tl.load(logits_ptr + row * logits_stride + cols, mask=inb, other=0.0).to(tl.float32)
    member = tl.zeros(cols.shape, dtype=tl.int32)
    for k0 in range(0, n_index, INDEX_BLOCK):
        ks = k0 + tl.arange(0, INDEX_BLOCK)
        idx = tl.load(index_ptr + row * index_stride + ks, mask=ks < n_index, other=-1)
        member += tl.sum((cols[:, None] == idx[None, :]).to(tl.int32), axis=1)
    valid = inb & (s != float("-inf"))
    a = tl.where(valid & (member > 0), -s, float("-inf"))
    b = tl.where(valid & (member == 0), s, float("-inf"))
    return a, b, inb


@triton.jit
def zlpr_sparse_forward_kernel(logits_ptr, index_ptr, partial_ptr, n_cols, n_index, cols_per_split,
                               logits_stride, index_stride, BLOCK: tl.constexpr, INDEX_BLOCK: tl.constexpr):
    """As zlpr_forward_kernel (same partial states, same combine) with targets from the index list."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    start = split * cols_per_split
    m_pos = 0.0
    m_neg = 0.0
    l_pos = (split == 0).to(tl.float32)
    l_neg = (split == 0).to(tl.float32)
    for offset in range(0, cols_per_split, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        a, b, _ = _sparse_row_tile(logits_ptr, index_ptr, row, cols, n_cols, n_index, logits_stride,
                                   index_stride, INDEX_BLOCK)
        m_pos, l_pos = _online_logsumexp(m_pos, l_pos, a)
        m_neg, l_neg = _online_logsumexp(m_neg, l_neg, b)
    _store_partial(partial_ptr + (row * n_splits + split) * 5, m_pos, l_pos, m_neg, l_neg, 0.0)


@triton.jit
def zlpr_sparse_backward_kernel(logits_ptr, index_ptr, lse_ptr, grad_loss_ptr, grad_logits_ptr, n_cols, n_index,
                                logits_stride, index_stride, BLOCK: tl.constexpr, INDEX_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    a, b, inb = _sparse_row_tile(logits_ptr, index_ptr, row, cols, n_cols, n_index, logits_stride,
                                 index_stride, INDEX_BLOCK)
    g = tl.load(grad_loss_ptr + row).to(tl.float32)
    grad = g * (tl.exp(b - tl.load(lse_ptr + row * 2 + 1)) - tl.exp(a - tl.load(lse_ptr + row * 2)))
    tl.store(grad_logits_ptr + row * n_cols + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=inb)


def sparse_forward(logits, pos_index, n_splits=None):
    """logits [N, C] (row-contiguous), pos_index [N, K] int64 (validated). Returns (loss [N], lse [N, 2])
    in float32."""
    n_rows, n_cols = logits.shape
    block = _block(n_cols, SPARSE_BLOCK)
    n_splits, cols_per_split = _splits(n_rows, n_cols, block, logits.device, n_splits)
    partial = torch.empty(n_rows, n_splits, _PARTIAL, dtype=torch.float32, device=logits.device)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    bad = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, lse
    zlpr_sparse_forward_kernel[(n_rows, n_splits)](
        logits, pos_index, partial, n_cols, pos_index.shape[1], cols_per_split, logits.stride(0), pos_index.stride(0),
        BLOCK=block, INDEX_BLOCK=INDEX_BLOCK, num_warps=NUM_WARPS)
    zlpr_combine_kernel[(n_rows,)](partial, loss, lse, bad, n_splits,
                                   SPLITS=max(2, triton.next_power_of_2(n_splits)), num_warps=1)
    return loss, lse


def sparse_backward(logits, pos_index, lse, grad_loss, out=None):
    """Returns grad_logits in logits.dtype (written to `out` when given; it may be logits itself)."""
    n_rows, n_cols = logits.shape
    grad_logits = torch.empty_like(logits) if out is None else out
    if n_rows == 0 or n_cols == 0:
        return grad_logits
    block = _block(n_cols, SPARSE_BLOCK)
    zlpr_sparse_backward_kernel[(n_rows, triton.cdiv(n_cols, block))](
        logits, pos_index, lse, grad_loss.contiguous(), grad_logits, n_cols, pos_index.shape[1],
        logits.stride(0), pos_index.stride(0), BLOCK=block, INDEX_BLOCK=INDEX_BLOCK, num_warps=NUM_WARPS)
    return grad_logits


def chunk_loss_and_grad(logits, targets, pos_index, row_scale, need_grad, lse=None):
    """The fused-linear epilogue for one chunk of rows (see the numba module): logits [R, C] float32,
    owned by the caller, is overwritten by row_scale[i] dL/dlogits when need_grad. lse: optional
    [R, 2] (LA, LB) known beforehand (label-parallel: combined over the shards); the forward kernels
    are then skipped and the gradient uses them.
    Returns (loss [R], lse [R, 2], bad-target count as a tensor)."""
    if lse is not None:
        lse = lse.to(torch.float32).contiguous()
        if need_grad:
            if targets is None:
                sparse_backward(logits, pos_index, lse, row_scale.to(torch.float32), out=logits)
            else:
                zlpr_backward(logits, targets, None, lse, row_scale.to(torch.float32), False, out=logits)
        return lse.sum(1), lse, torch.zeros((), device=logits.device)
    if targets is None:
        loss, lse = sparse_forward(logits, pos_index)
        n_bad = torch.zeros((), device=logits.device)
        if need_grad:
            sparse_backward(logits, pos_index, lse, row_scale.to(torch.float32), out=logits)
        return loss, lse, n_bad
    loss, lse, n_bad = zlpr_forward(logits, targets, None)
    if need_grad:
        zlpr_backward(logits, targets, None, lse, row_scale.to(torch.float32), False, out=logits)
    return loss, lse, n_bad


# Every configuration the launchers use, for ahead-of-time compilation in the tests:
# (kernel, signature, constexprs, num_warps).
def _aot_configs():
    configs = []
    for logits_ty in ("fp32", "fp16", "bf16"):
        for targets_ty in (logits_ty, "u8"):
            for has_mask in (False, True):
                sig_common = {"logits_ptr": f"*{logits_ty}", "targets_ptr": f"*{targets_ty}",
                              "mask_ptr": "*u8" if has_mask else f"*{logits_ty}"}
                strides = {"logits_stride": "i32", "targets_stride": "i32", "mask_stride": "i32"}
                for block in (16, FORWARD_BLOCK) if logits_ty == "fp32" else (FORWARD_BLOCK,):
                    configs.append((zlpr_forward_kernel,
                                    {**sig_common, "partial_ptr": "*fp32", "n_cols": "i32",
                                     "cols_per_split": "i32", **strides,
                                     "HAS_MASK": "constexpr", "BLOCK": "constexpr"},
                                    {"HAS_MASK": has_mask, "BLOCK": block}, NUM_WARPS))
                for need_t in (False, True):
                    grad_t_ty = targets_ty if need_t else logits_ty
                    configs.append((zlpr_backward_kernel,
                                    {**sig_common, "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32",
                                     "grad_logits_ptr": f"*{logits_ty}", "grad_targets_ptr": f"*{grad_t_ty}",
                                     "n_cols": "i32", **strides, "HAS_MASK": "constexpr",
                                     "NEED_GRAD_TARGETS": "constexpr", "BLOCK": "constexpr"},
                                    {"HAS_MASK": has_mask, "NEED_GRAD_TARGETS": need_t,
                                     "BLOCK": BACKWARD_BLOCK}, NUM_WARPS))
    for logits_ty in ("fp32", "fp16", "bf16"):
        common = {"logits_ptr": f"*{logits_ty}", "index_ptr": "*i64"}
        for block in (16, SPARSE_BLOCK) if logits_ty == "fp32" else (SPARSE_BLOCK,):
            configs.append((zlpr_sparse_forward_kernel,
                            {**common, "partial_ptr": "*fp32", "n_cols": "i32", "n_index": "i32",
                             "cols_per_split": "i32", "logits_stride": "i32", "index_stride": "i32",
                             "BLOCK": "constexpr", "INDEX_BLOCK": "constexpr"},
                            {"BLOCK": block, "INDEX_BLOCK": INDEX_BLOCK}, NUM_WARPS))
        configs.append((zlpr_sparse_backward_kernel,
                        {**common, "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", "grad_logits_ptr": f"*{logits_ty}",
                         "n_cols": "i32", "n_index": "i32", "logits_stride": "i32", "index_stride": "i32",
                         "BLOCK": "constexpr", "INDEX_BLOCK": "constexpr"},
                        {"BLOCK": SPARSE_BLOCK, "INDEX_BLOCK": INDEX_BLOCK}, NUM_WARPS))
    for splits in (2, 64, 1024):
        configs.append((zlpr_combine_kernel,
                        {"partial_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "bad_ptr": "*fp32",
                         "n_splits": "i32", "SPLITS": "constexpr"}, {"SPLITS": splits}, 1))
    return configs


AOT_CONFIGS = _aot_configs()
