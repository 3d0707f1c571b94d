"""Amos optimiser step on the GPU (specs/amos.md section 6): two launches per tensor.

A tensor is viewed as [outer, reduced, inner] with one slot per (outer, inner) pair.
    slots:  grid (outer, inner tiles). Each program sums the clipped g^2 of BLOCK_I slots down the
            reduced axis in [BLOCK_R, BLOCK_I] tiles, updates v and b in fp32 and writes two
            coefficients per slot, decay = delta (gamma/2 + l2) and scale = delta lr eta sqrt(r).
            The count t is read from its device tensor: no host sync, CUDA-graph friendly.
    apply:  grid (element tiles). theta <- theta - decay theta - scale clip(g), through the
            momentum EMA when there is one; theta keeps its dtype, the math is fp32.
Traffic: g twice, theta once each way (plus m), against AdamW's theta, g, m, v read and theta, m, v
written.
"""
import math

import torch
import triton
import triton.language as tl

APPLY_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def amos_slots_kernel(g_ptr, v_ptr, b_ptr, coef_ptr, step_ptr, n_reduced, n_inner,
                      lr, lr_eta, sqrt_lr, sqrt_lr_eta, beta, log2_beta, c_coef, d_coef, extra_l2, epsilon, clip,
                      BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    outer = tl.program_id(0).to(tl.int64)
    inner = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_inner = inner < n_inner
    base = g_ptr + outer * n_reduced * n_inner
    acc = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
    for r0 in range(0, n_reduced, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < n_reduced)[:, None] & in_inner[None, :]
        g = tl.load(base + rows.to(tl.int64)[:, None] * n_inner + inner[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.minimum(tl.maximum(g, -clip), clip)
        acc += g * g
    g2 = tl.sum(acc, axis=0) / n_reduced.to(tl.float32)
    slot = outer * n_inner + inner
    v = tl.load(v_ptr + slot, mask=in_inner, other=0.0)
    b = tl.load(b_ptr + slot, mask=in_inner, other=0.0)
    t = tl.load(step_ptr).to(tl.float32)
    v = beta * v + (1.0 - beta) * g2
    r = (1.0 - tl.exp2(t * log2_beta)) / tl.maximum(v, epsilon)
    gamma = lr * lr * r * g2 / tl.sqrt(1.0 + c_coef * sqrt_lr * b)
    delta = 1.0 / (1.0 + d_coef * sqrt_lr_eta * b)
    tl.store(v_ptr + slot, v, mask=in_inner)
    tl.store(b_ptr + slot, b + gamma * (1.0 + b), mask=in_inner)
    tl.store(coef_ptr + 2 * slot, delta * (0.5 * gamma + extra_l2), mask=in_inner)
    tl.store(coef_ptr + 2 * slot + 1, delta * lr_eta * tl.sqrt(r), mask=in_inner)


@triton.jit
def amos_apply_kernel(theta_ptr, g_ptr, m_ptr, coef_ptr, n_elements, n_reduced, n_inner, clip, momentum,
                      HAS_MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    slot = (offs // (n_reduced * n_inner)) * n_inner + offs % n_inner
    decay = tl.load(coef_ptr + 2 * slot, mask=inb, other=0.0)
    scale = tl.load(coef_ptr + 2 * slot + 1, mask=inb, other=0.0)
    theta = tl.load(theta_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.minimum(tl.maximum(g, -clip), clip)
    d = -decay * theta - scale * g
    if HAS_MOMENTUM:
        d = momentum * tl.load(m_ptr + offs, mask=inb, other=0.0) + (1.0 - momentum) * d
        tl.store(m_ptr + offs, d, mask=inb)
    tl.store(theta_ptr + offs, (theta + d).to(theta_ptr.dtype.element_ty), mask=inb)


def _blocks(n_reduced, n_inner):
    """(BLOCK_R, BLOCK_I): a tile of ~4096 entries, as wide along the slots as they allow."""
    block_i = min(64, triton.next_power_of_2(n_inner))
    block_r = min(max(1, 4096 // block_i), triton.next_power_of_2(n_reduced))
    return block_r, block_i


def amos_step_tensor(param, grad, m, v, b, step, layout, hyper):
    """One Amos step on `param` in place (CUDA, or CPU under the interpreter); v, b (and m) fp32
    slots, step the incremented count as a device tensor; layout (outer, reduced, inner)."""
    outer, reduced, inner = layout
    if param.numel() == 0:
        return
    theta = param.detach() if param.is_contiguous() else param.detach().contiguous()
    grad = grad.contiguous()
    lr, eta, beta = hyper["lr"], hyper["eta"], hyper["beta"]
    clip = math.inf if hyper["clip_value"] is None else hyper["clip_value"]
    coef = torch.empty(outer * inner * 2, dtype=torch.float32, device=param.device)
    block_r, block_i = _blocks(reduced, inner)
    amos_slots_kernel[(outer, triton.cdiv(inner, block_i))](
        grad, v, b, coef, step, reduced, inner, lr, lr * eta, math.sqrt(lr), math.sqrt(lr * eta), beta,
        math.log2(beta) if beta > 0 else -math.inf, hyper["c_coef"], hyper["d_coef"], hyper["extra_l2"],
        hyper["epsilon"], clip, BLOCK_R=block_r, BLOCK_I=block_i, num_warps=NUM_WARPS)
    has_momentum = hyper["momentum"] is not None
    amos_apply_kernel[(triton.cdiv(theta.numel(), APPLY_BLOCK),)](
        theta, grad, m if has_momentum else theta, coef, theta.numel(), reduced, inner, clip,
        hyper["momentum"] or 0.0, HAS_MOMENTUM=has_momentum, BLOCK=APPLY_BLOCK, num_warps=NUM_WARPS)
    if not param.is_contiguous():
        param.copy_(theta)


def _aot_configs():
    scalars = {name: "fp32" for name in ("lr", "lr_eta", "sqrt_lr", "sqrt_lr_eta", "beta", "log2_beta", "c_coef",
                                         "d_coef", "extra_l2", "epsilon", "clip")}
    configs = []
    for ty in ("fp32", "fp16", "bf16"):
        slots_sig = {"g_ptr": f"*{ty}", "v_ptr": "*fp32", "b_ptr": "*fp32", "coef_ptr": "*fp32", "step_ptr": "*fp32",
                     "n_reduced": "i32", "n_inner": "i32", **scalars, "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"}
        for block_r, block_i in ((4096, 1), (64, 64), (1, 64)):
            configs.append((amos_slots_kernel, slots_sig, {"BLOCK_R": block_r, "BLOCK_I": block_i}, NUM_WARPS))
        apply_sig = {"theta_ptr": f"*{ty}", "g_ptr": f"*{ty}", "m_ptr": "*fp32", "coef_ptr": "*fp32",
                     "n_elements": "i64", "n_reduced": "i32", "n_inner": "i32", "clip": "fp32", "momentum": "fp32",
                     "HAS_MOMENTUM": "constexpr", "BLOCK": "constexpr"}
        for has_momentum in (False, True):
            configs.append((amos_apply_kernel, apply_sig, {"HAS_MOMENTUM": has_momentum, "BLOCK": APPLY_BLOCK},
                            NUM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
