"""EXACT (expected accuracy under Gaussian logit noise) on the GPU. Math: docs/exact.md, 'Stable forms'.

One program per row streams the classes in [BLOCK, K] tiles (K Gauss-Hermite nodes), keeping the K
accumulators S_k = sum_i log Phi(r_i + t_k) in registers; the backward re-reads the logits and the
saved S. The label's own column and out-of-range columns get r = +inf, i.e. log Phi = 0 and zero
gradient; r saturates at +-R_MAX and ties get r = 0, so infinite logits and sigma -> 0 (1/sigma =
inf: the hard argmax, zero gradients) stay finite, as in the CPU kernel (kernels/numba/exact.py).
log Phi uses the erfcx fit shared with the CPU kernel (kernels/numba/_math.py), so the
interpreter and every GPU evaluate the same formula.
"""
import torch
import triton
import triton.language as tl

BLOCK = 64
NUM_WARPS = 4
R_MAX = tl.constexpr(1e4)  # as in kernels/numba/exact.py


NODES = (16, 32, 64)  # quadrature sizes compiled (tl.arange needs a power of two)


def unsupported(nodes):
    """Why these kernels cannot take `nodes` quadrature nodes, or None."""
    return None if nodes in NODES else f"triton compiles nodes in {{{', '.join(map(str, NODES))}}}"


@triton.jit
def _log_ndtr(x):
    z = tl.abs(x) * 0.70710678118654752
    t = 1.0 / (1.0 + 0.5 * z)
    g = 3.1119374997e-03
    g = g * t + 2.6580492116e-02
    g = g * t - 1.9654373217e-01
    g = g * t + 4.4426432245e-01
    g = g * t - 4.1540959662e-01
    g = g * t + 1.1193219892e-01
    g = g * t - 5.2596306229e-02
    g = g * t + 9.2123984113e-02
    g = g * t + 1.7547268883e-01
    g = g * t + 2.4687525697e-01
    g = g * t + 2.8209396715e-01
    g = g * t + 2.8209479440e-01
    # erfc(z) = t g exp(-z^2): left tail in log space, right side as log(1 - u)
    left = tl.log(t * g) - z * z - 0.69314718055994531
    u = 0.5 * t * g * tl.exp(-z * z)
    series = -u * (1.0 + u * (0.5 + u * (0.33333333 + u * 0.25)))
    right = tl.where(u < 0.01, series, tl.log(1.0 - u))
    return tl.where(x < 0.0, left, right)


@triton.jit
def _tile_margins(logits_ptr, row, cols, n_cols, stride, y, label_logit, inv_sigma, margin):
    """(s, r) for one tile: r = min(s_y - s, margin) / sigma clipped to +-R_MAX, 0 at ties, +inf at
    the label and past the row. Selects, not min/max, so that a NaN logit stays NaN."""
    inb = cols < n_cols
    s = tl.load(logits_ptr + row * stride + cols, mask=inb, other=0.0).to(tl.float32)
    m = label_logit - s
    m = tl.where(m > margin, margin, m)
    r = m * inv_sigma
    r = tl.where(r > R_MAX, R_MAX, tl.where(r < -R_MAX, -R_MAX, r))
    r = tl.where((m == 0.0) | (s == label_logit), 0.0, r)
    r = tl.where(inb & (cols != y), r, float("inf"))
    return s, r, inb


@triton.jit
def exact_forward_kernel(logits_ptr, labels_ptr, inv_sigma_ptr, nodes_ptr, log_weights_ptr,
                         log_terms_ptr, prob_ptr, n_cols, stride, margin,
                         K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    k = tl.arange(0, K)
    nodes = tl.load(nodes_ptr + k)
    ignored = y < 0
    y_safe = tl.where(ignored, 0, y)
    label_logit = tl.load(logits_ptr + row * stride + y_safe).to(tl.float32)
    inv_sigma = tl.load(inv_sigma_ptr + row)
    acc = tl.zeros([K], dtype=tl.float32)
    if not ignored:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            _, r, _ = _tile_margins(logits_ptr, row, cols, n_cols, stride, y, label_logit, inv_sigma, margin)
            acc += tl.sum(_log_ndtr(r[:, None] + nodes[None, :]), axis=0)
    tl.store(log_terms_ptr + row * K + k, acc)
    prob = tl.sum(tl.exp(tl.load(log_weights_ptr + k) + acc), axis=0)
    tl.store(prob_ptr + row, tl.where(ignored, 1.0, prob))


@triton.jit
def exact_backward_kernel(logits_ptr, labels_ptr, inv_sigma_ptr, nodes_ptr, log_weights_ptr,
                          log_terms_ptr, grad_prob_ptr, grad_logits_ptr, grad_sigma_ptr,
                          n_cols, stride, margin, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    k = tl.arange(0, K)
    nodes = tl.load(nodes_ptr + k)
    ignored = y < 0
    y_safe = tl.where(ignored, 0, y)
    label_logit = tl.load(logits_ptr + row * stride + y_safe).to(tl.float32)
    inv_sigma = tl.load(inv_sigma_ptr + row)
    # G / sigma with log(1/sigma) in the exponent: an underflowed G is never scaled up by 1/sigma.
    # 1/sigma = inf is the sigma -> 0 limit, a step function of the logits: no gradient.
    live = ~ignored & (inv_sigma < float("inf"))
    base = (tl.load(log_weights_ptr + k) + tl.load(log_terms_ptr + row * K + k) - 0.9189385332046727
            + tl.log(inv_sigma))
    g = tl.where(ignored, 0.0, tl.load(grad_prob_ptr + row).to(tl.float32))
    sum_label = 0.0
    sum_sigma = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s, r, inb = _tile_margins(logits_ptr, row, cols, n_cols, stride, y, label_logit, inv_sigma, margin)
        x = r[:, None] + nodes[None, :]
        dp_ds = tl.sum(tl.exp(base[None, :] - 0.5 * x * x - _log_ndtr(x)), axis=1)
        competitor = inb & (cols != y) & live
        # the margin clip passes no gradient above M (torch.clamp passes it at equality); a tie of
        # infinite logits (NaN difference) passes none either
        d = tl.where(competitor & (label_logit - s <= margin), dp_ds, 0.0)
        sum_label += tl.sum(d, axis=0)
        sum_sigma += tl.sum(tl.where(competitor, r * dp_ds, 0.0), axis=0)
        tl.store(grad_logits_ptr + row * n_cols + cols, (-g * d).to(grad_logits_ptr.dtype.element_ty),
                 mask=inb & (cols != y))
    tl.store(grad_logits_ptr + row * n_cols + y_safe, (g * sum_label).to(grad_logits_ptr.dtype.element_ty))
    tl.store(grad_sigma_ptr + row, -g * sum_sigma)


def exact_forward(logits, labels, sigma_rows, margin, nodes, log_weights):
    """See kernels/numba/exact.py; returns (P [B] float32, S [B, K] float32)."""
    n_rows, n_cols = logits.shape
    n_nodes = nodes.shape[0]
    device = logits.device
    prob = torch.empty(n_rows, dtype=torch.float32, device=device)
    log_terms = torch.empty(n_rows, n_nodes, dtype=torch.float32, device=device)
    if n_rows:
        exact_forward_kernel[(n_rows,)](
            logits, labels, (1.0 / sigma_rows.detach().float()).contiguous(), nodes.float().to(device),
            log_weights.float().to(device), log_terms, prob, n_cols, logits.stride(0), float(margin),
            K=n_nodes, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return prob, log_terms


def exact_backward(logits, labels, sigma_rows, margin, nodes, log_weights, log_terms, grad_prob):
    n_rows, n_cols = logits.shape
    device = logits.device
    grad_logits = torch.empty_like(logits)
    grad_sigma = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows:
        exact_backward_kernel[(n_rows,)](
            logits, labels, (1.0 / sigma_rows.detach().float()).contiguous(), nodes.float().to(device),
            log_weights.float().to(device), log_terms, grad_prob.float().contiguous(), grad_logits, grad_sigma,
            n_cols, logits.stride(0), float(margin), K=nodes.shape[0], BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_logits, grad_sigma


def _aot_configs():
    configs = []
    for logits_ty in ("fp32", "fp16", "bf16"):
        common = {"logits_ptr": f"*{logits_ty}", "labels_ptr": "*i64", "inv_sigma_ptr": "*fp32",
                  "nodes_ptr": "*fp32", "log_weights_ptr": "*fp32", "log_terms_ptr": "*fp32"}
        for n_nodes in NODES:
            constexprs = {"K": n_nodes, "BLOCK": BLOCK}
            configs.append((exact_forward_kernel,
                            {**common, "prob_ptr": "*fp32", "n_cols": "i32", "stride": "i32", "margin": "fp32",
                             "K": "constexpr", "BLOCK": "constexpr"}, constexprs, NUM_WARPS))
            configs.append((exact_backward_kernel,
                            {**common, "grad_prob_ptr": "*fp32", "grad_logits_ptr": f"*{logits_ty}",
                             "grad_sigma_ptr": "*fp32", "n_cols": "i32", "stride": "i32", "margin": "fp32",
                             "K": "constexpr", "BLOCK": "constexpr"}, constexprs, NUM_WARPS))
    return configs


AOT_CONFIGS = _aot_configs()
