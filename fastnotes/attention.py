"""Relative-position attention with post-softmax corrections (URPE, l2 normalisation), fused
forward and backward. Math: docs/attention.md; Su, kexue.fm/archives/9105; Luo et al. 2022 (URPE).

Every relative term reaches the kernels as one vector per head along the diagonals of the score
matrix (Lq + Lk - 1 entries): the table gathers, the ALiBi term and the causal mask are built here
in plain torch, so their gradients (tables, slopes) follow from the kernels' diagonal gradients by
autograd, and the [Lq, Lk] matrix never exists.
"""
import functools
import math

import torch
import torch.nn.functional as F

from . import _checks, _dispatch, _registry
from ._autograd import AUTOCAST_CASTS, autocast_dtype, autocast_off, once_differentiable
from .reference import attention as reference

_OP = "relpos_attention"
NORMALIZERS = reference.NORMALIZERS


def _check_buckets(op, num_buckets, max_distance, bidirectional):
    if not isinstance(bidirectional, bool):
        raise TypeError(f"{op}: bidirectional must be a bool, got {type(bidirectional).__name__}")
    smallest = 4 if bidirectional else 2
    if not (isinstance(num_buckets, int) and num_buckets >= smallest):
        raise ValueError(f"{op}: num_buckets must be an int >= {smallest}, got {num_buckets!r}")
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if not (isinstance(max_distance, int) and max_distance > max_exact):
        raise ValueError(f"{op}: max_distance must be an int > {max_exact} (the exact range), got {max_distance!r}")


def t5_bucket(relative_position, num_buckets=32, max_distance=128, bidirectional=True):
    """T5's relative-position bucket (HF convention, relative_position = key - query) as int64.
    Bidirectional: the sign takes half the buckets; within a half, distances below num_buckets/4
    get their own bucket and longer ones share log-spaced buckets up to max_distance (clamped)."""
    _checks.check_tensor("t5_bucket", "relative_position", relative_position)
    if relative_position.is_floating_point() or relative_position.is_complex() or \
            relative_position.dtype == torch.bool:
        raise TypeError(f"t5_bucket: relative_position must be an integer tensor, got {relative_position.dtype}")
    _check_buckets("t5_bucket", num_buckets, max_distance, bidirectional)
    return reference.t5_bucket(relative_position, num_buckets, max_distance, bidirectional)


def _check_table(name, table, heads, rel_buckets, device):
    _checks.check_tensor(_OP, name, table, _checks.FLOAT_DTYPES)
    if table.dim() != 2 or table.shape[0] != heads:
        raise ValueError(f"{_OP}: {name} must be [heads={heads}, R], got {tuple(table.shape)}")
    if rel_buckets is not None and table.shape[1] != rel_buckets[0]:
        raise ValueError(f"{_OP}: {name} must have num_buckets={rel_buckets[0]} columns with rel_buckets, "
                         f"got {table.shape[1]}")
    if rel_buckets is None and table.shape[1] % 2 == 0:
        raise ValueError(f"{_OP}: {name} without rel_buckets is indexed by the clipped distance and needs an odd "
                         f"width 2P + 1 (column P is distance 0), got {table.shape[1]}")
    if table.device != device:
        raise ValueError(f"{_OP}: {name} is on {table.device} but q is on {device}")


def _check_arguments(q, k, v, causal, scale, rel_bias, rel_buckets, alibi_slopes, post_table, normalizer,
                     key_padding_mask, dropout_p, dropout_seed):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(_OP, name, t, _checks.FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D [batch, heads, length, head_dim], got {tuple(t.shape)}")
        if 0 in t.shape:
            raise ValueError(f"{_OP}: {name} has an empty dimension: {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{_OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _checks.check_same_device(_OP, "q", q, k=k, v=v, key_padding_mask=key_padding_mask)
    batch, heads, _, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"{_OP}: q, k, v must share the batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"{_OP}: k and v must be [batch, kv_heads, Lk, .] alike, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if heads % k.shape[1] != 0:
        raise ValueError(f"{_OP}: the kv heads of k and v ({k.shape[1]}) must divide the heads of q ({heads})")
    if k.shape[3] != dim:
        raise ValueError(f"{_OP}: k must have the head dim of q ({dim}), got {k.shape[3]}")
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{_OP}: scale must be None or a finite number, got {scale!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"{_OP}: normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if rel_buckets is not None:
        if not (isinstance(rel_buckets, (tuple, list)) and len(rel_buckets) == 3):
            raise ValueError(f"{_OP}: rel_buckets must be (num_buckets, max_distance, bidirectional), got {rel_buckets!r}")
        _check_buckets(_OP, *rel_buckets)
        if rel_bias is None and post_table is None:
            raise ValueError(f"{_OP}: rel_buckets given without rel_bias or post_table to index")
    if rel_bias is not None:
        _check_table("rel_bias", rel_bias, heads, rel_buckets, q.device)
    if post_table is not None:
        _check_table("post_table", post_table, heads, rel_buckets, q.device)
    if alibi_slopes is not None:
        _checks.check_tensor(_OP, "alibi_slopes", alibi_slopes, _checks.FLOAT_DTYPES)
        if alibi_slopes.shape != (heads,):
            raise ValueError(f"{_OP}: alibi_slopes must be [heads={heads}], got {tuple(alibi_slopes.shape)}")
        _checks.check_same_device(_OP, "q", q, alibi_slopes=alibi_slopes)
    if key_padding_mask is not None:
        _checks.check_tensor(_OP, "key_padding_mask", key_padding_mask, (torch.bool,))
        if key_padding_mask.shape != (batch, k.shape[2]):
            raise ValueError(f"{_OP}: key_padding_mask must be bool [batch={batch}, Lk={k.shape[2]}] (True = keep), "
                             f"got {tuple(key_padding_mask.shape)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"{_OP}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)
                                     or not 0 <= dropout_seed < 2 ** 32):
        raise ValueError(f"{_OP}: dropout_seed must be None or an int in [0, 2^32), got {dropout_seed!r}")


@functools.lru_cache(maxsize=256)
def _diagonal_index(lq, lk, width, rel_buckets, device):
    """Table column of each diagonal (reference.table_index of delta). Cached: a model calls the op
    with the same lengths in every layer, and decoding with Lq = 1 repeats each Lk once per layer;
    the bucket arithmetic would otherwise cost more than a decode step's kernel."""
    delta = (lk - 1) - torch.arange(lq + lk - 1, device=device)
    return reference.table_index(delta, width, rel_buckets)


def diagonal_terms(q, k, causal, rel_bias, rel_buckets, alibi_slopes, post_table, key_padding_mask):
    """(bias_diag [H, Lq + Lk - 1], post_diag [H, Lq + Lk - 1], key_bias [B, Lk]) in the compute
    dtype, entry e for the diagonal j - i = e - (Lq - 1). Differentiable in the tables and slopes."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, lq = q.shape[:3]
    lk = k.shape[2]
    if rel_bias is not None:
        bias = rel_bias.to(work)[:, _diagonal_index(lq, lk, rel_bias.shape[1], rel_buckets, q.device)]
    else:
        bias = torch.zeros(heads, lq + lk - 1, dtype=work, device=q.device)
    if alibi_slopes is not None or (causal and lq > 1):  # with Lq = 1 every key is visible (delta >= 0)
        delta = (lk - 1) - torch.arange(lq + lk - 1, device=q.device)  # i + (Lk - Lq) - j on each diagonal
        if alibi_slopes is not None:
            bias = bias - alibi_slopes.to(work)[:, None] * delta.abs().to(work)
        if causal:
            bias = bias.masked_fill(delta < 0, -math.inf)
    if post_table is not None:
        post = post_table.to(work)[:, _diagonal_index(lq, lk, post_table.shape[1], rel_buckets, q.device)]
    else:
        post = torch.ones(heads, lq + lk - 1, dtype=work, device=q.device)
    key_bias = torch.zeros(batch, lk, dtype=work, device=q.device)
    if key_padding_mask is not None:
        key_bias = key_bias.masked_fill(~key_padding_mask, -math.inf)
    return bias, post, key_bias


def _single_query(q, k, v, rel_bias, rel_buckets, alibi_slopes, post_table, key_padding_mask, scale, normalizer):
    """The op for Lq = 1 without autograd (a decode step) in a few torch ops: the score "matrix"
    is one row per head, O(Lk) like the kernels' buffers, and a kernel launch would cost more than
    the work. Builds only the terms the call has (one query row sees every key: no causal mask)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = q.dtype
    batch, heads, _, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    if q.dtype != work:  # (a no-op .to still costs microseconds, a fair part of a decode call)
        q, k, v = q.to(work), k.to(work), v.to(work)
    bias = None  # [H, Lk]: entry j is the diagonal e = j (delta = Lk - 1 - j >= 0)
    if rel_bias is not None:  # index_select: a few us, where tensor[:, index] takes ~15
        bias = rel_bias.to(work).index_select(1, _diagonal_index(1, lk, rel_bias.shape[1], rel_buckets, q.device))
    if alibi_slopes is not None:
        distance = torch.arange(lk - 1, -1, -1, device=q.device, dtype=work)
        bias = (0 if bias is None else bias) - alibi_slopes.to(work)[:, None] * distance
    mask = None if bias is None else bias.view(1, heads, 1, lk)
    if key_padding_mask is not None:
        padding = torch.zeros(batch, 1, 1, lk, dtype=work, device=q.device).masked_fill_(
            ~key_padding_mask.view(batch, 1, 1, lk), -math.inf)
        mask = padding if mask is None else mask + padding
    if normalizer == "softmax" and post_table is None:  # plain softmax with an additive row: torch's fused SDPA
        gqa = {"enable_gqa": True} if kv_heads != heads else {}  # passing enable_gqa=False costs ~8 us
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)
    else:
        group = heads // kv_heads
        s = torch.matmul(q.reshape(batch, kv_heads, group, dim), k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            s.add_(mask.view(-1, kv_heads, group, lk))
        a = torch.softmax(s, dim=-1)
        if normalizer == "l2":  # exp(s) / sqrt(sum exp(2 s)) = p / ||p|| for p = softmax(s)
            a.mul_(torch.rsqrt((a * a).sum(dim=-1, keepdim=True)))
        if post_table is not None:
            index = _diagonal_index(1, lk, post_table.shape[1], rel_buckets, q.device)
            a.mul_(post_table.to(work).index_select(1, index).view(kv_heads, group, lk))
        out = torch.matmul(a, v).reshape(batch, heads, 1, v.shape[3])
    if key_padding_mask is not None:  # rows whose keys are all masked give 0 (softmax gave NaN there)
        out = out.masked_fill(~key_padding_mask.any(dim=1).view(batch, 1, 1, 1), 0.0)
    return out.to(out_dtype)


class _RelPosAttentionFunction(torch.autograd.Function):
    """Attention output [B, H, Lq, E] through a fused kernel module; gradients for q, k, v and the
    diagonal vectors (which autograd folds into the tables and slopes)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal, dropout, kernels):
        out, stat = kernels.attention_forward(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal,
                                              *dropout)
        ctx.save_for_backward(q, k, v, bias_diag, post_diag, key_bias, out, stat)
        ctx.scale, ctx.normalizer, ctx.causal, ctx.dropout, ctx.kernels = scale, normalizer, causal, dropout, kernels
        return out

    @staticmethod
    @once_differentiable(_OP)  # a double backward raises (the kernels' backward has no graph)
    def backward(ctx, grad_out):
        q, k, v, bias_diag, post_diag, key_bias, out, stat = ctx.saved_tensors
        with autocast_off(q.device):  # a backward called inside autocast: the launchers' torch ops as in forward
            dq, dk, dv, dbias, dpost = ctx.kernels.attention_backward(
                q, k, v, bias_diag, post_diag, key_bias, ctx.scale, ctx.normalizer, ctx.causal, out, stat, grad_out,
                *ctx.dropout)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dbias if needs[3] else None, dpost if needs[4] else None, None, None, None, None, None, None)


@_dispatch.eager_op
def relpos_attention(q, k, v, *, causal=False, scale=None, rel_bias=None, rel_buckets=None, alibi_slopes=None,
                     post_table=None, normalizer="softmax", key_padding_mask=None, dropout_p=0.0, dropout_seed=None):
    """Attention with relative-position terms before and after the normalisation, fused (the
    [Lq, Lk] matrix never exists; the backward recomputes it from one saved statistic per row).

        s_ij = scale <q_i, k_j> + rel_bias[h, idx(delta)] - alibi_slopes[h] |delta|   (masked: -inf)
        softmax: a_ij = exp(s_ij) / sum_j exp(s_ij)
        l2:      a_ij = exp(s_ij) / sqrt(sum_j exp(2 s_ij))        (Su's l2 normalisation)
        o_i = sum_j a_ij post_table[h, idx(delta)] Z_ij v_j        (URPE: no renormalisation)
        Z_ij = keep_ij / (1 - dropout_p), 1 without dropout        (attention dropout)

    delta = i + (Lk - Lq) - j (query row i sits at position i + Lk - Lq, the KV-cache convention).
    idx: T5 bucket of key - query = -delta when rel_buckets = (num_buckets, max_distance,
    bidirectional) is given (both tables then have num_buckets columns), else the clipped distance
    clamp(delta, -P, P) + P for a table of odd width 2P + 1.

    Args:
        q: [B, H, Lq, D]; k: [B, Hkv, Lk, D]; v: [B, Hkv, Lk, E]; Hkv divides H (GQA/MQA: query
            head h reads kv head h // (H / Hkv)). float32/float16/bfloat16, float64 on CPU.
        causal: hide keys with delta < 0.
        scale: score scale, default 1/sqrt(D).
        rel_bias, post_table: [H, R] tables (get gradients); alibi_slopes: [H] (gets a gradient).
        normalizer: 'softmax' | 'l2'.
        key_padding_mask: bool [B, Lk], True = attend.
        dropout_p: attention-weight dropout probability in [0, 1) (pass 0 in eval mode: the op has no
            training flag). The keep mask is a hash of (dropout_seed, b * H + h, i, j), the same on every
            backend (kernels/_dropout.py), recomputed in the backward (nothing [Lq, Lk] is stored);
            the normalisers sum the undropped weights, as dropout after softmax does.
        dropout_seed: int in [0, 2^32); None draws one from torch's default CPU generator (so
            torch.manual_seed makes runs repeatable).
    Rows whose keys are all masked give 0 (and zero gradients). The kernels' gradients are
    deterministic (private partial sums, no atomics); the fold of the diagonal gradients into the
    tables is torch's gather backward (deterministic on CPU; on CUDA under
    torch.use_deterministic_algorithms(True)).
    Returns [B, H, Lq, E] in q's dtype. Under autocast, q, k, v are first cast to autocast's dtype
    (as for a matmul; float64 stays), so the output is in that dtype; the kernels accumulate in
    float32 and the tables and slopes keep their dtype.
    """
    lower = autocast_dtype(q.device) if isinstance(q, torch.Tensor) else None
    if lower is not None:
        q, k, v = (t.to(lower) if isinstance(t, torch.Tensor) and t.dtype in AUTOCAST_CASTS else t for t in (q, k, v))
        with autocast_off(q.device):
            return relpos_attention(q, k, v, causal=causal, scale=scale, rel_bias=rel_bias, rel_buckets=rel_buckets,
                                    alibi_slopes=alibi_slopes, post_table=post_table, normalizer=normalizer,
                                    key_padding_mask=key_padding_mask, dropout_p=dropout_p, dropout_seed=dropout_seed)
    _check_arguments(q, k, v, causal, scale, rel_bias, rel_buckets, alibi_slopes, post_table, normalizer,
                     key_padding_mask, dropout_p, dropout_seed)
    dropout_p = float(dropout_p)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = int(torch.randint(2 ** 32, (), dtype=torch.int64))
    dropout = (dropout_p, dropout_seed or 0)
    if rel_buckets is not None:
        rel_buckets = tuple(rel_buckets)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    backend = _dispatch.select(_OP, q.device.type,
                               lambda b: _dispatch.kernel_reason(_registry.ATTENTION, b, q, "q", q=q, v=v))
    if backend == "reference":
        return reference.relpos_attention(q, k, v, causal=causal, scale=scale, rel_bias=rel_bias,
                                          rel_buckets=rel_buckets, alibi_slopes=alibi_slopes, post_table=post_table,
                                          normalizer=normalizer, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                          dropout_seed=dropout[1])
    if q.shape[2] == 1 and backend == "numba" and dropout_p == 0 and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rel_bias, alibi_slopes, post_table))):
        return _single_query(q, k, v, rel_bias, rel_buckets, alibi_slopes, post_table, key_padding_mask, scale,
                             normalizer)
    kernels = _registry.ATTENTION.kernels(backend)
    bias_diag, post_diag, key_bias = diagonal_terms(q, k, causal, rel_bias, rel_buckets, alibi_slopes, post_table,
                                                    key_padding_mask)
    return _RelPosAttentionFunction.apply(q, k, v, bias_diag, post_diag, key_bias, scale, normalizer, causal,
                                          dropout, kernels)


def alibi_slopes(num_heads):
    """ALiBi's slopes m_h = 2^(-8 (h + 1) / H) as a float32 tensor [H] (H a power of 2 in the paper)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


_MOVED_TO_NN = ("T5RelativeBias", "RelPosSelfAttention")


def __getattr__(name):
    """The modules moved to fastnotes.nn; their old import path keeps working."""
    if name in _MOVED_TO_NN:
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
