"""Ladder Side-Tuning's gated merge on the GPU (docs/lst.md).

forward:  grid (row tiles, column tiles): one GEMM tile h W^T with the blend in the epilogue,
          o = a s + c (acc + b); mu = sigmoid(alpha / T) is computed in-kernel from the device
          scalar alpha (no host sync). z is never stored.
backward: rows kernel, grid (row tiles): ds = a g, per-tile column sums of g and sum(g s);
          gram kernel, grid (d tiles, D tiles): G = g^T h over the tokens, dW = c G, and per-tile
          <W, G>. Partials are reduced afterwards in a fixed order (deterministic, no atomics):
          db = c sum(g), dalpha = mu (1 - mu) / T (sum(g s) - <W, G> - <b, sum(g)>).
fp32 GEMMs use IEEE fp32 (no TF32), to match the fp32 reference.
"""
import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
ROWS_BLOCK_M, ROWS_BLOCK_N = 32, 64
NUM_WARPS = 4
GEMM_WARPS = 8  # the fp32 (IEEE) 64x64 tiles spill on sm_80 with 4 warps


@triton.jit
def _gate(alpha_ptr, inv_temperature, GATED: tl.constexpr):
    if GATED:
        mu = 1.0 / (1.0 + tl.exp(-tl.load(alpha_ptr).to(tl.float32) * inv_temperature))
        return mu, 1.0 - mu
    return 1.0, 1.0


@triton.jit
def ladder_merge_forward_kernel(s_ptr, h_ptr, w_ptr, b_ptr, alpha_ptr, out_ptr, n_rows, d, D, inv_temperature,
                                GATED: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    in_cols = cols < d
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        in_k = ks < D
        h = tl.load(h_ptr + rows[:, None] * D + ks[None, :], mask=in_rows[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * D + ks[:, None], mask=in_k[:, None] & in_cols[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    a, c = _gate(alpha_ptr, inv_temperature, GATED)
    mask = in_rows[:, None] & in_cols[None, :]
    offs = rows[:, None] * d + cols[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a * s + c * (acc + b[None, :])).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ladder_merge_rows_kernel(g_ptr, s_ptr, alpha_ptr, ds_ptr, col_sums_ptr, gs_sums_ptr, n_rows, d, inv_temperature,
                             GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < n_rows
    a, _ = _gate(alpha_ptr, inv_temperature, GATED)
    gs = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        in_cols = cols < d
        mask = in_rows[:, None] & in_cols[None, :]
        offs = rows[:, None] * d + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + offs, (a * g).to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(col_sums_ptr + tile * d + cols, tl.sum(g, axis=0), mask=in_cols)
        gs += g * s
    tl.store(gs_sums_ptr + tile, tl.sum(tl.sum(gs, axis=1), axis=0))


@triton.jit
def ladder_merge_gram_kernel(g_ptr, h_ptr, w_ptr, alpha_ptr, dw_ptr, wg_sums_ptr, n_rows, d, D, inv_temperature,
                             GATED: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # over d
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # over D
    in_rows = rows < d
    in_cols = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        in_n = ns < n_rows
        ns64 = ns.to(tl.int64)
        gt = tl.load(g_ptr + ns64[None, :] * d + rows[:, None], mask=in_rows[:, None] & in_n[None, :], other=0.0)
        h = tl.load(h_ptr + ns64[:, None] * D + cols[None, :], mask=in_n[:, None] & in_cols[None, :], other=0.0)
        acc = tl.dot(gt, h, acc, input_precision=PRECISION)
    _, c = _gate(alpha_ptr, inv_temperature, GATED)
    mask = in_rows[:, None] & in_cols[None, :]
    offs = rows[:, None] * D + cols[None, :]
    tl.store(dw_ptr + offs, (c * acc).to(dw_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(wg_sums_ptr + tile, tl.sum(tl.sum(w * acc, axis=1), axis=0))


def _precision(x):
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _alpha_arg(alpha, like):
    return alpha.reshape(1).to(torch.float32) if alpha is not None else torch.zeros(1, device=like.device)


def ladder_merge_forward(s, h, weight, bias, alpha, temperature):
    """s [N, d], h [N, D], weight [d, D], bias [d]: contiguous tensors of one dtype; alpha a 0-d
    tensor or None (ungated). Returns o [N, d]."""
    n_rows, d = s.shape
    D = h.shape[1]
    out = torch.empty_like(s)
    if n_rows == 0 or d == 0:
        return out
    grid = (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(d, BLOCK_N))
    ladder_merge_forward_kernel[grid](s, h, weight, bias, _alpha_arg(alpha, s), out, n_rows, d, D, 1.0 / temperature,
                                      GATED=alpha is not None, PRECISION=_precision(h),
                                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=GEMM_WARPS)
    return out


def ladder_merge_backward(g, s, h, weight, bias, alpha, temperature):
    """(ds, dW, db, dalpha) for the upstream gradient g [N, d]; dalpha is None without a gate."""
    n_rows, d = g.shape
    D = h.shape[1]
    gated = alpha is not None
    alpha_arg = _alpha_arg(alpha, g)
    n_tiles = max(1, triton.cdiv(n_rows, ROWS_BLOCK_M))
    grad_s = torch.empty_like(g)
    col_sums = torch.zeros(n_tiles, d, dtype=torch.float32, device=g.device)
    gs_sums = torch.zeros(n_tiles, dtype=torch.float32, device=g.device)
    grad_w = torch.zeros_like(weight)
    grid_w = (triton.cdiv(d, BLOCK_M), triton.cdiv(D, BLOCK_N))
    wg_sums = torch.zeros(grid_w[0] * grid_w[1], dtype=torch.float32, device=g.device)
    if n_rows and d:
        ladder_merge_rows_kernel[(n_tiles,)](g, s, alpha_arg, grad_s, col_sums, gs_sums, n_rows, d, 1.0 / temperature,
                                             GATED=gated, BLOCK_M=ROWS_BLOCK_M, BLOCK_N=ROWS_BLOCK_N,
                                             num_warps=NUM_WARPS)
        if D:
            ladder_merge_gram_kernel[grid_w](g, h, weight, alpha_arg, grad_w, wg_sums, n_rows, d, D, 1.0 / temperature,
                                             GATED=gated, PRECISION=_precision(h), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                             BLOCK_K=BLOCK_K, num_warps=GEMM_WARPS)
    sum_g = col_sums.sum(0)
    if not gated:
        return grad_s, grad_w, sum_g.to(bias.dtype), None
    mu = torch.sigmoid(alpha.to(torch.float32) / temperature)
    grad_b = ((1 - mu) * sum_g).to(bias.dtype)
    # <W, G> from the tiles: the kernel summed W * (G) before scaling by c
    gate_sum = gs_sums.sum() - wg_sums.sum() - (bias.to(torch.float32) * sum_g).sum()
    return grad_s, grad_w, grad_b, (mu * (1 - mu) / temperature * gate_sum).to(alpha.dtype)


def _aot_configs():
    configs = []
    for ty in ("fp32", "fp16", "bf16"):
        precision = "ieee" if ty == "fp32" else "tf32"
        for gated in (False, True):
            fwd = {"s_ptr": f"*{ty}", "h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "b_ptr": f"*{ty}", "alpha_ptr": "*fp32",
                   "out_ptr": f"*{ty}", "n_rows": "i32", "d": "i32", "D": "i32", "inv_temperature": "fp32",
                   "GATED": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                   "BLOCK_K": "constexpr"}
            blocks = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
            configs.append((ladder_merge_forward_kernel, fwd, {"GATED": gated, "PRECISION": precision, **blocks},
                            GEMM_WARPS))
            rows = {"g_ptr": f"*{ty}", "s_ptr": f"*{ty}", "alpha_ptr": "*fp32", "ds_ptr": f"*{ty}",
                    "col_sums_ptr": "*fp32", "gs_sums_ptr": "*fp32", "n_rows": "i32", "d": "i32",
                    "inv_temperature": "fp32", "GATED": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            configs.append((ladder_merge_rows_kernel, rows,
                            {"GATED": gated, "BLOCK_M": ROWS_BLOCK_M, "BLOCK_N": ROWS_BLOCK_N}, NUM_WARPS))
            gram = {"g_ptr": f"*{ty}", "h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "alpha_ptr": "*fp32", "dw_ptr": f"*{ty}",
                    "wg_sums_ptr": "*fp32", "n_rows": "i32", "d": "i32", "D": "i32", "inv_temperature": "fp32",
                    "GATED": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                    "BLOCK_K": "constexpr"}
            configs.append((ladder_merge_gram_kernel, gram, {"GATED": gated, "PRECISION": precision, **blocks},
                            GEMM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
