"""The "n x m classification" loss L1 on the GPU (docs/nm_class.md).

One program per sample owns its whole [n, m] block in registers: the row logsumexp over m, then the
column logsumexp over the n tasks with the appended zero, in float32. The backward recomputes
p = exp(s - lse_i) and w = exp(log t + lse_i - s - logA_j) from the saved statistics and does the
row sum W_i = sum_j w_ij in the same program: grad = g (p W_i - w).
Blocks larger than MAX_BLOCK elements are not supported here (the numba and reference backends are).
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK = 8192  # padded n * m held by one program


def _num_warps(bn, bm):
    """About 16 block elements per thread: the block's temporaries stay in registers."""
    return max(1, min(16, bn * bm // 512))


def unsupported(n, m):
    """Why the kernel cannot take [n, m] blocks, or None."""
    size = triton.next_power_of_2(max(n, 1)) * triton.next_power_of_2(max(m, 1))
    if size > MAX_BLOCK:
        return f"triton holds one [n, m] block per program: padded n * m = {size} > {MAX_BLOCK}"
    return None


@triton.jit
def _block(logits_ptr, targets_ptr, sample, n, m, SOFT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """(lse per task, log(t (1/p - 1)) per entry) for one sample, float32."""
    rows = tl.arange(0, BN)[:, None]
    cols = tl.arange(0, BM)[None, :]
    inb = (rows < n) & (cols < m)
    base = sample.to(tl.int64) * n * m
    s = tl.load(logits_ptr + base + rows * m + cols, mask=inb, other=float("-inf")).to(tl.float32)
    if SOFT:
        t = tl.load(targets_ptr + base + rows * m + cols, mask=inb, other=0.0).to(tl.float32)
    else:
        label = tl.load(targets_ptr + sample.to(tl.int64) * n + rows, mask=rows < n, other=-1)
        t = (cols == label).to(tl.float32)
    top = tl.max(s, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)  # padded rows
    is_top = s == top[:, None]
    # rest = sum of exp(s - top) over the non-maximal entries: 1 - p = rest / (1 + rest) for the
    # maximum, computed without cancellation (the only entry that can have p > 1/2)
    rest = tl.sum(tl.where(is_top, 0.0, tl.exp(s - top[:, None])), axis=1)
    lse = top + tl.log(tl.sum(tl.where(is_top, 1.0, 0.0), axis=1) + rest)
    x = tl.minimum(s - lse[:, None], 0.0)  # log p
    log1m_top = tl.log(rest) - tl.log(1.0 + rest)
    log1mexp = tl.where(is_top & (x > -0.6931471805599453), log1m_top[:, None], tl.log(1.0 - tl.exp(x)))
    z = tl.where(inb & (t > 0.0), tl.log(t) - x + log1mexp, float("-inf"))
    return lse, z


@triton.jit
def nm_class_forward_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, log_a_ptr, n, m,
                            SOFT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    sample = tl.program_id(0)
    lse, z = _block(logits_ptr, targets_ptr, sample, n, m, SOFT, BN, BM)
    top = tl.maximum(tl.max(z, axis=0), 0.0)  # the appended zero keeps every column finite
    log_a = top + tl.log(tl.sum(tl.exp(z - top[None, :]), axis=0) + tl.exp(-top))
    cols = tl.arange(0, BM)
    log_a = tl.where(cols < m, log_a, 0.0)
    rows = tl.arange(0, BN)
    tl.store(lse_ptr + sample.to(tl.int64) * n + rows, lse, mask=rows < n)
    tl.store(log_a_ptr + sample.to(tl.int64) * m + cols, log_a, mask=cols < m)
    tl.store(loss_ptr + sample, tl.sum(log_a, axis=0))


@triton.jit
def nm_class_backward_kernel(logits_ptr, targets_ptr, lse_ptr, log_a_ptr, grad_loss_ptr, grad_ptr, n, m,
                             SOFT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    sample = tl.program_id(0)
    rows = tl.arange(0, BN)[:, None]
    cols = tl.arange(0, BM)[None, :]
    inb = (rows < n) & (cols < m)
    base = sample.to(tl.int64) * n * m
    s = tl.load(logits_ptr + base + rows * m + cols, mask=inb, other=0.0).to(tl.float32)
    if SOFT:
        t = tl.load(targets_ptr + base + rows * m + cols, mask=inb, other=0.0).to(tl.float32)
    else:
        label = tl.load(targets_ptr + sample.to(tl.int64) * n + rows, mask=rows < n, other=-1)
        t = (cols == label).to(tl.float32)
    lse = tl.load(lse_ptr + sample.to(tl.int64) * n + rows, mask=rows < n, other=0.0)
    log_a = tl.load(log_a_ptr + sample.to(tl.int64) * m + cols, mask=cols < m, other=0.0)
    w = tl.where(inb & (t > 0.0), tl.exp(tl.log(t) + lse - s - log_a), 0.0)
    p = tl.where(inb, tl.exp(s - lse), 0.0)
    g = tl.load(grad_loss_ptr + sample).to(tl.float32)
    grad = g * (p * tl.sum(w, axis=1)[:, None] - w)
    tl.store(grad_ptr + base + rows * m + cols, grad.to(grad_ptr.dtype.element_ty), mask=inb)


def _blocks(n, m):
    return max(2, triton.next_power_of_2(n)), max(2, triton.next_power_of_2(m))


def nm_class_forward(logits, targets):
    """logits [B, n, m] contiguous; targets soft [B, n, m] or integer [B, n] (int64).
    Returns (loss [B], lse [B, n], logA [B, m]) in float32."""
    n_samples, n, m = logits.shape
    device = logits.device
    loss = torch.empty(n_samples, dtype=torch.float32, device=device)
    lse = torch.empty(n_samples, n, dtype=torch.float32, device=device)
    log_a = torch.empty(n_samples, m, dtype=torch.float32, device=device)
    if n_samples == 0:
        return loss, lse, log_a
    soft = targets.dtype.is_floating_point
    bn, bm = _blocks(n, m)
    nm_class_forward_kernel[(n_samples,)](logits, targets if soft else targets.to(torch.int64), loss, lse, log_a,
                                          n, m, SOFT=soft, BN=bn, BM=bm, num_warps=_num_warps(bn, bm))
    return loss, lse, log_a


def nm_class_backward(logits, targets, lse, log_a, grad_loss):
    """Returns grad_logits [B, n, m] in logits.dtype."""
    n_samples, n, m = logits.shape
    grad = torch.empty_like(logits)
    if n_samples == 0:
        return grad
    soft = targets.dtype.is_floating_point
    bn, bm = _blocks(n, m)
    nm_class_backward_kernel[(n_samples,)](logits, targets if soft else targets.to(torch.int64), lse, log_a,
                                           grad_loss.to(torch.float32).contiguous(), grad, n, m,
                                           SOFT=soft, BN=bn, BM=bm, num_warps=_num_warps(bn, bm))
    return grad


def _aot_configs():
    configs = []
    for ty in ("fp32", "fp16", "bf16"):
        for soft in (False, True):
            targets_ty = ty if soft else "i64"
            for bn, bm in ((2, 2), (512, 16), (64, 128)):
                constexprs = {"SOFT": soft, "BN": bn, "BM": bm}
                meta = {"SOFT": "constexpr", "BN": "constexpr", "BM": "constexpr"}
                configs.append((nm_class_forward_kernel,
                                {"logits_ptr": f"*{ty}", "targets_ptr": f"*{targets_ty}", "loss_ptr": "*fp32",
                                 "lse_ptr": "*fp32", "log_a_ptr": "*fp32", "n": "i32", "m": "i32", **meta},
                                constexprs, _num_warps(bn, bm)))
                configs.append((nm_class_backward_kernel,
                                {"logits_ptr": f"*{ty}", "targets_ptr": f"*{targets_ty}", "lse_ptr": "*fp32",
                                 "log_a_ptr": "*fp32", "grad_loss_ptr": "*fp32", "grad_ptr": f"*{ty}", "n": "i32",
                                 "m": "i32", **meta}, constexprs, _num_warps(bn, bm)))
    return configs


# Every configuration the launchers use is a (BN, BM) pair of powers of two with BN * BM <= MAX_BLOCK;
# these cover the corners (tiny, tall, wide at the limit) for ahead-of-time compilation in the tests.
AOT_CONFIGS = _aot_configs()
