"""Relative-position attention in plain torch (docs/attention.md, 'The math'): the float64
test oracle and the fallback. It materialises the [Lq, Lk] score matrix of every head; the fused
kernels never do.

Conventions shared with the kernels:
  delta = i + (Lk - Lq) - j for query row i and key j (query row i sits at absolute position
  i + Lk - Lq, the KV-cache convention), so delta >= 0 means the key is in the past;
  causal hides delta < 0; a T5 table is indexed by t5_bucket(j - (i + Lk - Lq)) = t5_bucket(-delta);
  a table without buckets has an odd width 2P + 1 and is indexed by clamp(delta, -P, P) + P;
  ALiBi adds -slope_h * |delta|.
"""
import math

import torch

from ..kernels._dropout import COL_J, FMIX_1, FMIX_2, LOW32, ROW_BH, ROW_I, dropout_threshold

NORMALIZERS = ("softmax", "l2")


def t5_bucket(relative_position, num_buckets=32, max_distance=128, bidirectional=True):
    """T5's bucket of relative_position = key - query (an integer tensor), as int64 (spec section 4)."""
    rel = relative_position.to(torch.int64)
    nb = num_buckets
    ret = torch.zeros_like(rel)
    if bidirectional:
        nb //= 2
        ret = ret + (rel > 0).to(torch.int64) * nb
        n = rel.abs()
    else:
        n = (-rel).clamp_min(0)
    max_exact = nb // 2
    # float64 log, as in the spec's formula; n >= max_exact >= 1 wherever the value is used
    ratio = n.clamp_min(1).double() / max_exact
    large = max_exact + (torch.log(ratio) / math.log(max_distance / max_exact) * (nb - max_exact)).floor().to(torch.int64)
    large = large.clamp_max(nb - 1)
    return ret + torch.where(n < max_exact, n, large)


def relative_distance(lq, lk, device=None):
    """delta [Lq, Lk] = i + (Lk - Lq) - j, int64."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return i + (lk - lq) - j


def table_index(delta, width, rel_buckets=None):
    """Column of a [H, width] relative table for each delta: T5 buckets of key - query when
    rel_buckets = (num_buckets, max_distance, bidirectional) is given, else the clipped distance
    clamp(delta, -P, P) + P with width = 2P + 1."""
    if rel_buckets is not None:
        num_buckets, max_distance, bidirectional = rel_buckets
        return t5_bucket(-delta, num_buckets, max_distance, bidirectional)
    half = (width - 1) // 2
    return delta.clamp(-half, half) + half


_LOW32 = LOW32


def _mul32(x, constant):
    """x * constant mod 2^32 for int64 tensors x in [0, 2^32), in halves (no int64 overflow)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _LOW32


def fmix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_2)
    return x ^ (x >> 16)


def dropout_keep(seed, batch, heads, lq, lk, p, device=None):
    """bool [B, H, Lq, Lk]: which attention weights dropout keeps (the hash of kernels/_dropout.py)."""
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    i = torch.arange(lq, dtype=torch.int64, device=device).view(1, 1, lq, 1)
    j = torch.arange(lk, dtype=torch.int64, device=device).view(1, 1, 1, lk)
    row = fmix32((seed + _mul32(bh, ROW_BH)) & _LOW32)
    row = fmix32((row + _mul32(i, ROW_I)) & _LOW32)
    return fmix32((row + _mul32(j, COL_J)) & _LOW32) >= dropout_threshold(p)


def relpos_attention(q, k, v, *, causal=False, scale=None, rel_bias=None, rel_buckets=None, alibi_slopes=None,
                     post_table=None, normalizer="softmax", key_padding_mask=None, dropout_p=0.0, dropout_seed=0):
    """Reference of fastnotes.relpos_attention (arguments assumed valid; the public op checks them).

    s_ij = scale <q_i, k_j> + T[h, idx(delta)] - slope_h |delta|   (masked: -inf)
    softmax: a_ij = exp(s_ij) / sum_j exp(s_ij);  l2: a_ij = exp(s_ij) / sqrt(sum_j exp(2 s_ij))
    o_i = sum_j a_ij C[h, idx(delta)] Z_ij v_j   (C multiplies after the normalisation, no renormalisation;
    Z_ij = dropout_keep(...) / (1 - dropout_p), 1 without dropout)
    Rows with every key masked give 0. Works in float32 for float16/bfloat16 inputs.
    """
    out_dtype = q.dtype
    work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v = q.to(work), k.to(work), v.to(work)
    heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    group = heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                   # [B, H, Lq, Lk]
    delta = relative_distance(lq, lk, q.device)
    if rel_bias is not None:
        scores = scores + rel_bias.to(work)[:, table_index(delta, rel_bias.shape[1], rel_buckets)]
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(work)[:, None, None] * delta.abs().to(work)
    masked = torch.zeros(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        masked = masked | (delta < 0)
    masked = masked.expand(q.shape[0], 1, lq, lk)
    if key_padding_mask is not None:
        masked = masked | ~key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(masked, -math.inf)
    # the row max cancels in both normalisers: detach it, and use 0 for fully masked rows
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    if normalizer == "softmax":
        norm = p.sum(dim=-1, keepdim=True)
    else:
        norm = (p * p).sum(dim=-1, keepdim=True)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    attn = p / (norm if normalizer == "softmax" else torch.sqrt(norm))
    if post_table is not None:
        attn = attn * post_table.to(work)[:, table_index(delta, post_table.shape[1], rel_buckets)]
    if dropout_p > 0:
        keep = dropout_keep(dropout_seed, q.shape[0], heads, lq, lk, dropout_p, q.device)
        attn = attn * keep.to(work) / (1.0 - dropout_p)
    return torch.matmul(attn, v).to(out_dtype)
