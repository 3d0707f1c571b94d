"""Amos optimiser step on the GPU (docs/amos.md): a multi-tensor step, two launches
for all the tensors of a parameter group that share a dtype (plus one when both row- and
column-slotted tensors are present).

Each tensor is viewed as [outer, reduced, inner] with one slot per (outer, inner) pair. A table
holds every tensor's pointers (as int64), sizes and offset into one shared coefficient buffer:
    slots:  one program per task (tensor, outer index, tile of BLOCK_I slots) sums the clipped g^2
            of its slots down the reduced axis in [BLOCK_R, BLOCK_I] tiles, updates v and b in fp32
            and writes two coefficients per slot, decay = delta (gamma/2 + l2) and
            scale = delta lr eta sqrt(r). The count t is read from each tensor's step tensor: no host
            sync, CUDA-graph friendly.
    apply:  one program per BLOCK elements of one tensor: theta <- theta - decay theta - scale clip(g),
            through the momentum EMA when there is one; theta keeps its dtype, the math is fp32.
Traffic: g twice, theta once each way (plus m), against AdamW's theta, g, m, v read and theta, m, v
written.
Large gradients: a square overflows float32 above ~1.8e19. A slot whose sum of squares comes out inf
is summed again as (g / unit)^2 with unit its largest |g| (two more passes, only in the programs that
hold such a slot), and its v and epsilon guard are carried in units of unit^2; v is stored saturated
at the largest float32.
"""
import math

import torch
import triton
import triton.language as tl

APPLY_BLOCK = 1024
FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
NUM_WARPS = 4
# columns of the int64 tensor table
_THETA, _G, _M, _V, _B, _STEP, _COEF, _REDUCED, _INNER, _NUMEL = range(10)
_COLS = 10


@triton.jit
def _pointer(table_ptr, row, col, like):
    """Entry (row, col) of the int64 table as a pointer of like's type."""
    return tl.load(table_ptr + row * 10 + col).to(like.dtype, bitcast=True)


@triton.jit
def amos_slots_kernel(tasks_ptr, tensors_ptr, scales_ptr, coef_ptr, g_like,
                      lr, sqrt_lr, beta, one_minus_beta, log2_beta, c_coef, d_coef, extra_l2, epsilon, clip,
                      BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    task = tl.program_id(0)
    j = tl.load(tasks_ptr + task * 3)
    outer = tl.load(tasks_ptr + task * 3 + 1)
    inner = tl.load(tasks_ptr + task * 3 + 2) + tl.arange(0, BLOCK_I)
    g_ptr = _pointer(tensors_ptr, j, 1, g_like)
    v_ptr = _pointer(tensors_ptr, j, 3, coef_ptr)
    b_ptr = _pointer(tensors_ptr, j, 4, coef_ptr)
    step_ptr = _pointer(tensors_ptr, j, 5, coef_ptr)
    coef_base = tl.load(tensors_ptr + j * 10 + 6)
    n_reduced = tl.load(tensors_ptr + j * 10 + 7)
    n_inner = tl.load(tensors_ptr + j * 10 + 8)
    lr_eta = tl.load(scales_ptr + j * 2)
    sqrt_lr_eta = tl.load(scales_ptr + j * 2 + 1)
    in_inner = inner < n_inner
    base = g_ptr + outer * n_reduced * n_inner
    acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
    for r0 in range(0, n_reduced, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < n_reduced)[:, None] & in_inner[None, :]
        g = tl.load(base + rows[:, None] * n_inner + inner[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(tl.maximum(g, -clip), clip)
        acc += g * g
    sum_sq = tl.sum(acc, axis=0)
    unit = tl.full([BLOCK_I], 1.0, tl.float32)
    if tl.max(sum_sq, axis=0) > FLOAT32_MAX:  # a square overflowed: rescale those slots by their max |g|
        big = tl.zeros([BLOCK_I], dtype=tl.float32)
        for r0 in range(0, n_reduced, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows < n_reduced)[:, None] & in_inner[None, :]
            g = tl.load(base + rows[:, None] * n_inner + inner[None, :], mask=mask, other=0.0).to(tl.float32)
            big = tl.maximum(big, tl.max(tl.abs(tl.minimum(tl.maximum(g, -clip), clip)), axis=0))
        unit = tl.where(sum_sq > FLOAT32_MAX, big, 1.0)
        acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
        for r0 in range(0, n_reduced, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows < n_reduced)[:, None] & in_inner[None, :]
            g = tl.load(base + rows[:, None] * n_inner + inner[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.minimum(tl.maximum(g, -clip), clip) / unit[None, :]
            acc += g * g
        sum_sq = tl.sum(acc, axis=0)
    g2 = sum_sq / n_reduced.to(tl.float32)  # mean g^2 / unit^2
    slot = outer * n_inner + inner
    v = tl.load(v_ptr + slot, mask=in_inner, other=0.0)
    b = tl.load(b_ptr + slot, mask=in_inner, other=0.0)
    t = tl.load(step_ptr)
    u = beta * (v / unit / unit) + one_minus_beta * g2  # new v / unit^2
    guarded = tl.maximum(u, epsilon / unit / unit)  # max(new v, epsilon) / unit^2
    # 1 - beta^t in float64: in float32 it cancels (beta 0.999, t = 1: 6e-5 relative error)
    bias = (1.0 - tl.exp2(t.to(tl.float64) * log2_beta)).to(tl.float32)
    # r = bias / (guarded unit^2): gamma takes r g^2, the step sqrt(r) g
    gamma = lr * lr * (bias * g2 / guarded) / tl.sqrt(1.0 + c_coef * sqrt_lr * b)
    delta = 1.0 / (1.0 + d_coef * sqrt_lr_eta * b)
    tl.store(v_ptr + slot, tl.minimum(u * unit * unit, FLOAT32_MAX), mask=in_inner)
    tl.store(b_ptr + slot, b + gamma * (1.0 + b), mask=in_inner)
    coef = coef_ptr + 2 * (coef_base + slot)
    tl.store(coef, delta * (0.5 * gamma + extra_l2), mask=in_inner)
    tl.store(coef + 1, delta * lr_eta * tl.sqrt(bias / guarded) / unit, mask=in_inner)


@triton.jit
def amos_apply_kernel(blocks_ptr, tensors_ptr, coef_ptr, theta_like, clip, momentum, one_minus_momentum,
                      HAS_MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    j = tl.load(blocks_ptr + block * 2)
    offs = tl.load(blocks_ptr + block * 2 + 1) + tl.arange(0, BLOCK)
    theta_ptr = _pointer(tensors_ptr, j, 0, theta_like)
    g_ptr = _pointer(tensors_ptr, j, 1, theta_like)
    coef_base = tl.load(tensors_ptr + j * 10 + 6)
    n_reduced = tl.load(tensors_ptr + j * 10 + 7)
    n_inner = tl.load(tensors_ptr + j * 10 + 8)
    inb = offs < tl.load(tensors_ptr + j * 10 + 9)
    slot = coef_base + (offs // (n_reduced * n_inner)) * n_inner + offs % n_inner
    decay = tl.load(coef_ptr + 2 * slot, mask=inb, other=0.0)
    scale = tl.load(coef_ptr + 2 * slot + 1, mask=inb, other=0.0)
    theta = tl.load(theta_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.minimum(tl.maximum(g, -clip), clip)
    d = -decay * theta - scale * g
    if HAS_MOMENTUM:
        m_ptr = _pointer(tensors_ptr, j, 2, coef_ptr)
        d = momentum * tl.load(m_ptr + offs, mask=inb, other=0.0) + one_minus_momentum * d
        tl.store(m_ptr + offs, d, mask=inb)
    tl.store(theta_ptr + offs, (theta + d).to(theta_ptr.dtype.element_ty), mask=inb)


def _launch_group(items, hyper):
    """One dtype's tensors: items are (theta, grad, m, v, b, step, layout, eta) with theta and grad
    contiguous of that dtype, v, b, m fp32, step an fp32 device tensor."""
    device = items[0][0].device
    lr, beta = hyper["lr"], hyper["beta"]
    clip = math.inf if hyper["clip_value"] is None else hyper["clip_value"]
    table, scales, row_tasks, col_tasks, blocks = [], [], [], [], []
    n_slots = 0
    max_rows_reduced = max_cols_reduced = max_inner = 1
    for j, (theta, grad, m, v, b, step, (outer, reduced, inner), eta) in enumerate(items):
        table.append([theta.data_ptr(), grad.data_ptr(), 0 if m is None else m.data_ptr(), v.data_ptr(),
                      b.data_ptr(), step.data_ptr(), n_slots, reduced, inner, theta.numel()])
        scales.append([lr * eta, math.sqrt(lr * eta)])
        if inner == 1:
            row_tasks += [(j, o, 0) for o in range(outer)]
            max_rows_reduced = max(max_rows_reduced, reduced)
        else:
            col_tasks += [(j, o, i) for o in range(outer) for i in range(0, inner, 64)]
            max_cols_reduced, max_inner = max(max_cols_reduced, reduced), max(max_inner, inner)
        blocks += [(j, start) for start in range(0, theta.numel(), APPLY_BLOCK)]
        n_slots += outer * inner
    as_device = lambda rows, dtype: torch.tensor(rows, dtype=dtype).to(device)
    tensors = as_device(table, torch.int64)
    scales = as_device(scales, torch.float32)
    coef = torch.empty(2 * n_slots, dtype=torch.float32, device=device)
    # 1 - beta and 1 - momentum in float64 here: in float32 they cancel (1 - 0.999f loses 1e-5 relative)
    scalars = (lr, math.sqrt(lr), beta, 1 - beta, math.log2(beta) if beta > 0 else -math.inf, hyper["c_coef"],
               hyper["d_coef"], hyper["extra_l2"], hyper["epsilon"], clip)
    g_like = items[0][1]
    if row_tasks:
        block_r = min(1024, triton.next_power_of_2(max_rows_reduced))
        amos_slots_kernel[(len(row_tasks),)](as_device(row_tasks, torch.int64), tensors, scales, coef, g_like,
                                             *scalars, BLOCK_R=block_r, BLOCK_I=1, num_warps=NUM_WARPS)
    if col_tasks:
        block_i = min(64, triton.next_power_of_2(max_inner))
        block_r = min(max(1, 2048 // block_i), triton.next_power_of_2(max_cols_reduced))
        amos_slots_kernel[(len(col_tasks),)](as_device(col_tasks, torch.int64), tensors, scales, coef, g_like,
                                             *scalars, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=NUM_WARPS)
    has_momentum = hyper["momentum"] is not None
    amos_apply_kernel[(len(blocks),)](as_device(blocks, torch.int64), tensors, coef, items[0][0], clip,
                                      hyper["momentum"] or 0.0, 1 - (hyper["momentum"] or 0.0),
                                      HAS_MOMENTUM=has_momentum, BLOCK=APPLY_BLOCK, num_warps=NUM_WARPS)


def amos_step_tensors(items, hyper):
    """One Amos step for a parameter group (CUDA, or CPU under the interpreter): items are
    (param, grad, m or None, v, b, step, layout, eta) with fp32 slots and step tensors; hyper the
    group's settings. Tensors are stepped in place, grouped by dtype."""
    by_dtype = {}
    copies = []
    for param, grad, m, v, b, step, layout, eta in items:
        if param.numel() == 0:
            continue
        theta = param.detach() if param.is_contiguous() else param.detach().contiguous()
        if not param.is_contiguous():
            copies.append((param, theta))
        by_dtype.setdefault(param.dtype, []).append(
            (theta, grad.to(param.dtype).contiguous(), m, v, b, step, layout, eta))
    for group in by_dtype.values():
        _launch_group(group, hyper)
    for param, theta in copies:
        param.copy_(theta)


def _aot_configs():
    scalars = {name: "fp32" for name in ("lr", "sqrt_lr", "beta", "one_minus_beta", "log2_beta", "c_coef", "d_coef",
                                         "extra_l2", "epsilon", "clip")}
    configs = []
    for ty in ("fp32", "fp16", "bf16"):
        slots_sig = {"tasks_ptr": "*i64", "tensors_ptr": "*i64", "scales_ptr": "*fp32", "coef_ptr": "*fp32",
                     "g_like": f"*{ty}", **scalars, "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"}
        for block_r, block_i in ((1024, 1), (32, 64), (1, 64)):
            configs.append((amos_slots_kernel, slots_sig, {"BLOCK_R": block_r, "BLOCK_I": block_i}, NUM_WARPS))
        apply_sig = {"blocks_ptr": "*i64", "tensors_ptr": "*i64", "coef_ptr": "*fp32", "theta_like": f"*{ty}",
                     "clip": "fp32", "momentum": "fp32", "one_minus_momentum": "fp32", "HAS_MOMENTUM": "constexpr",
                     "BLOCK": "constexpr"}
        for has_momentum in (False, True):
            configs.append((amos_apply_kernel, apply_sig, {"HAS_MOMENTUM": has_momentum, "BLOCK": APPLY_BLOCK},
                            NUM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
