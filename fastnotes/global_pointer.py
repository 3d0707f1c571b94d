"""GlobalPointer span scores (Su, kexue.fm/archives/8373 and 8877) trained with ZLPR, fused: the
[B, H, n, n] scores never exist, forward or backward. Math, span convention and memory:
docs/global_pointer.md.

The public layer checks the arguments and the spans, turns the spans into per-row sorted lists of
positive pairs i * n + j and the token mask and type bias into per-type start/end bias vectors
[B, H, n] (-inf on padded tokens; autograd folds their gradients back into type_bias); the kernels
apply RoPE and the 1/sqrt(d) scale to q and k themselves, once per (batch, head).
"""
import math
import numbers

import torch

from . import _checks, _dispatch, _registry
from ._autograd import autocast_off, loss_dtype, once_differentiable
from .reference import global_pointer as reference

_OP = "global_pointer_loss"
_DECODE_OP = "global_pointer_decode"
_SCORES_OP = "global_pointer_scores"
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)  # signed: the padding is -1


class _GlobalPointerFunction(torch.autograd.Function):
    """Per-row ZLPR losses [B, H] of the GlobalPointer scores through a fused kernel module;
    gradients for q, k [B, n, Hq, d] and the start/end bias vectors [B, H, n]."""

    @staticmethod
    def forward(ctx, q, k, bias_start, bias_end, pos_index, rope_cos, rope_sin, scale, tril, kernels):
        loss, stats = kernels.global_pointer_forward(q, k, rope_cos, rope_sin, scale, bias_start, bias_end,
                                                     pos_index, tril)
        ctx.save_for_backward(q, k, bias_start, bias_end, pos_index, rope_cos, rope_sin, stats)
        ctx.scale, ctx.tril, ctx.kernels = scale, tril, kernels
        return loss

    @staticmethod
    @once_differentiable(_OP)
    def backward(ctx, grad_loss):
        q, k, bias_start, bias_end, pos_index, rope_cos, rope_sin, stats = ctx.saved_tensors
        with autocast_off(q.device):
            grad_q, grad_k, grad_start, grad_end = ctx.kernels.global_pointer_backward(
                q, k, rope_cos, rope_sin, ctx.scale, bias_start, bias_end, pos_index, ctx.tril, stats, grad_loss)
        needs = ctx.needs_input_grad
        return (grad_q if needs[0] else None, grad_k if needs[1] else None, grad_start if needs[2] else None,
                grad_end if needs[3] else None, None, None, None, None, None, None)


def _check_inputs(op, q, k, mask, rope, tril, type_bias):
    """(batch, n, types, head size) after checking q, k, mask, rope, tril and type_bias."""
    for name, t in (("q", q), ("k", k)):
        _checks.check_tensor(op, name, t, _checks.FLOAT_DTYPES)
    if q.dim() not in (3, 4):
        raise ValueError(f"{op}: q must be [batch, n, types, head_size] (or [batch, n, head_size] shared by "
                         f"the types, with type_bias), got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if 0 in q.shape:
        raise ValueError(f"{op}: q has an empty dimension: {tuple(q.shape)}")
    if not isinstance(rope, bool):
        raise TypeError(f"{op}: rope must be a bool, got {type(rope).__name__}")
    if not isinstance(tril, bool):
        raise TypeError(f"{op}: tril must be a bool, got {type(tril).__name__}")
    batch, n, d = q.shape[0], q.shape[1], q.shape[-1]
    if rope and d % 2:
        raise ValueError(f"{op}: RoPE rotates pairs of dimensions and needs an even head_size, got {d}")
    if type_bias is None:
        if q.dim() == 3:
            raise ValueError(f"{op}: q of shape [batch, n, head_size] is shared by the types (Efficient "
                             "GlobalPointer) and needs type_bias [batch, n, types, 2]")
        heads = q.shape[2]
    else:
        _checks.check_tensor(op, "type_bias", type_bias, _checks.FLOAT_DTYPES)
        heads = type_bias.shape[2] if type_bias.dim() == 4 else -1
        if type_bias.dim() != 4 or type_bias.shape != (batch, n, heads, 2) or heads == 0 or \
                (q.dim() == 4 and heads != q.shape[2]):
            want = f"[{batch}, {n}, {q.shape[2] if q.dim() == 4 else 'types'}, 2]"
            raise ValueError(f"{op}: type_bias must be {want} (start, end bias per token and type), "
                             f"got {tuple(type_bias.shape)}")
    if mask is not None:
        _checks.check_tensor(op, "mask", mask, (torch.bool,))
        if mask.shape != (batch, n):
            raise ValueError(f"{op}: mask must be bool [batch={batch}, n={n}] (True = token kept), "
                             f"got {tuple(mask.shape)}")
    _checks.check_same_device(op, "q", q, k=k, mask=mask, type_bias=type_bias)
    return batch, n, heads, d


def _positive_index(spans, batch, heads, n, mask, tril):
    """spans [B, H, P, 2] (start, end), padded with (-1, -1), as int64 [B, H, P] of i * n + j per row,
    ascending, -1 padding at the end; every bad span raises ValueError (a host sync on CUDA)."""
    op = _OP
    _checks.check_tensor(op, "spans", spans, _INT_DTYPES)
    if spans.dim() != 4 or spans.shape[:2] != (batch, heads) or spans.shape[3] != 2:
        raise ValueError(f"{op}: spans must be integer [batch={batch}, types={heads}, P, 2] (start, end) padded "
                         f"with -1, got {tuple(spans.shape)}")
    spans = spans.to(torch.int64)
    start, end = spans[..., 0], spans[..., 1]
    pad = (start == -1) & (end == -1)
    bad = ~pad & ((start < 0) | (start >= n) | (end < 0) | (end >= n))
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{op}: spans must lie in [0, n={n}) or be (-1, -1) padding; span {at} is "
                         f"{tuple(spans[at].tolist())}")
    if tril and bool((~pad & (end < start)).any()):
        at = tuple((~pad & (end < start)).nonzero()[0].tolist())
        raise ValueError(f"{op}: spans {at} = {tuple(spans[at].tolist())} ends before it starts (ends are "
                         "closed: end is the last token; tril=False allows pairs with end < start)")
    if mask is not None:
        rows = torch.arange(batch, device=spans.device)[:, None, None].expand(start.shape)
        padded = ~pad & ~(mask[rows, start.clamp(min=0)] & mask[rows, end.clamp(min=0)])
        if bool(padded.any()):
            at = tuple(padded.nonzero()[0].tolist())
            raise ValueError(f"{op}: spans {at} = {tuple(spans[at].tolist())} starts or ends on a token "
                             "the mask removes")
    sentinel = n * n
    keys = torch.where(pad, sentinel, start * n + end).sort(dim=-1).values
    repeated = (keys[..., 1:] == keys[..., :-1]) & (keys[..., 1:] != sentinel)
    if bool(repeated.any()):
        b, t = repeated.nonzero()[0, :2].tolist()
        raise ValueError(f"{op}: spans lists the same (start, end) twice for sample {b}, type {t}")
    return torch.where(keys == sentinel, -1, keys).contiguous()


def _bias_vectors(q, n, heads, mask, type_bias):
    """(bias_start, bias_end) [B, H, n] in the compute dtype: type_bias's two columns (or 0) with
    -inf on the tokens the mask removes. Differentiable in type_bias."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if type_bias is None:
        start = end = torch.zeros(q.shape[0], heads, n, dtype=work, device=q.device)
    else:
        start, end = (type_bias[..., c].to(work).transpose(1, 2) for c in (0, 1))
    if mask is not None:
        removed = ~mask[:, None, :]
        start, end = start.masked_fill(removed, -math.inf), end.masked_fill(removed, -math.inf)
    return start.contiguous(), end.contiguous()


def _kernel_arguments(q, k, n, heads, mask, rope, type_bias):
    """q, k as [B, n, Hq, d], the bias vectors, the RoPE tables (or None) and the scale."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.dim() == 3:
        q, k = q.unsqueeze(2), k.unsqueeze(2)
    d = q.shape[-1]
    cos, sin = reference.rope_tables(n, d, work, q.device) if rope else (None, None)
    return (q.contiguous(), k.contiguous(), *_bias_vectors(q, n, heads, mask, type_bias), cos, sin,
            1.0 / math.sqrt(d))


@_dispatch.eager_op
def global_pointer_loss(q, k, spans, *, mask=None, rope=True, tril=True, type_bias=None, reduction="mean"):
    """ZLPR loss of GlobalPointer span scores, fused (no [B, H, n, n] tensor, forward or backward).

        s[b, a, i, j] = <R_i q[b, i, a], R_j k[b, j, a]> / sqrt(d) + type_bias[b, i, a, 0] + type_bias[b, j, a, 1]
        loss[b, a] = log(1 + sum_{(i, j) in spans} e^{-s}) + log(1 + sum_{other allowed (i, j)} e^{s})

    R_i rotates the interleaved pairs (2m, 2m + 1) by i * 10000^(-2m/d) (RoPE as in bert4keras).
    Allowed pairs: both tokens kept by mask and, with tril, start <= end. The negatives are summed
    directly (not "all minus positives", which cancels when a positive dominates).

    Args:
        q, k: [B, n, H, d] per-type projections (GlobalPointer), or [B, n, d] shared by the types
            with type_bias (Efficient GlobalPointer). float32/float16/bfloat16 (float64 on CPU).
        spans: signed integer [B, H, P, 2] of (start, end) per sample and type, padded with (-1, -1); the
            end is closed (the index of the span's last token: a one-token span is (i, i)).
        mask: optional bool [B, n], False = padded token (no pair touching it counts).
        rope: rotate q and k by position (RoPE); tril: only pairs with start <= end.
        type_bias: optional [B, n, H, 2], added to the scores: [..., 0] at the start token, [..., 1]
            at the end token (fastnotes.nn.GlobalPointer maps bert4keras's halved dense output here).
        reduction: 'mean' | 'sum' over the B * H rows (bert4keras averages), or 'none' for [B, H].

    A span out of [0, n), listed twice in a row, ending before it starts (with tril), or starting or
    ending on a masked token raises ValueError before any kernel runs. A row without allowed pairs
    or without spans is finite (log(1 + 0) = 0 for an empty sum). Gradients flow to q, k and
    type_bias; the backward recomputes the score tiles from two saved numbers per row and cannot be
    differentiated again (use_backend('reference') can). Computes in float32 at least; the loss has
    q's dtype, float32 under autocast for float16/bfloat16 q.
    """
    batch, n, heads, _ = _check_inputs(_OP, q, k, mask, rope, tril, type_bias)
    _checks.check_same_device(_OP, "q", q, spans=spans)
    _checks.check_reduction(_OP, reduction)
    pos_index = _positive_index(spans, batch, heads, n, mask, tril)
    out_dtype = loss_dtype(q)
    backend = _dispatch.select(_OP, q.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.GLOBAL_POINTER, b, q, "q", q=q))
    if backend == "reference":
        with autocast_off(q.device):
            rows = reference.global_pointer_loss(q, k, spans, mask, rope, tril, type_bias, "none")
        return _checks.reduce(rows, reduction, out_dtype)
    kernels = _registry.GLOBAL_POINTER.kernels(backend)
    q4, k4, bias_start, bias_end, cos, sin, scale = _kernel_arguments(q, k, n, heads, mask, rope, type_bias)
    rows = _GlobalPointerFunction.apply(q4, k4, bias_start, bias_end, pos_index, cos, sin, scale, tril, kernels)
    return _checks.reduce(rows, reduction, out_dtype)


def _check_threshold(op, threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{op}: threshold must be a real number (int, float or a numpy scalar), got "
                        f"{type(threshold).__name__}")
    if not math.isfinite(threshold):
        raise ValueError(f"{op}: threshold must be finite, got {threshold!r}")


@_dispatch.eager_op
def global_pointer_decode(q, k, *, mask=None, threshold=0.0, rope=True, tril=True, type_bias=None):
    """The predicted spans: every allowed (start, end) whose GlobalPointer score (see
    global_pointer_loss) exceeds threshold (0: ZLPR's decision rule), found tile by tile without the
    [B, H, n, n] scores. Returns int64 [M, 4] rows (batch, type, start, end), end closed, sorted
    lexicographically, on q's device. Arguments as in global_pointer_loss; no gradient."""
    batch, n, heads, _ = _check_inputs(_DECODE_OP, q, k, mask, rope, tril, type_bias)
    _check_threshold(_DECODE_OP, threshold)
    backend = _dispatch.select(_DECODE_OP, q.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.GLOBAL_POINTER, b, q, "q", q=q))
    with torch.no_grad(), autocast_off(q.device):
        if backend == "reference":
            return reference.global_pointer_decode(q, k, mask, float(threshold), rope, tril, type_bias)
        q4, k4, bias_start, bias_end, cos, sin, scale = _kernel_arguments(q, k, n, heads, mask, rope, type_bias)
        return _registry.GLOBAL_POINTER.kernels(backend).global_pointer_decode(
            q4, k4, cos, sin, scale, bias_start, bias_end, tril, float(threshold)).to(q.device)


def global_pointer_scores(q, k, *, mask=None, rope=True, tril=True, type_bias=None):
    """The dense scores [B, H, n, n] (-inf on pairs that are not allowed), in plain torch and
    differentiable: for small inputs, inspection and debugging. Arguments as in global_pointer_loss;
    float32 for float16/bfloat16 inputs."""
    _check_inputs(_SCORES_OP, q, k, mask, rope, tril, type_bias)
    return reference.scores(q, k, mask, rope, tril, type_bias)
