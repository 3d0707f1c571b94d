"""Attention modules over relpos_attention: a learned T5 bucket table and a self-attention layer
(projections + the op). Math: docs/attention.md."""
import torch

from ..attention import NORMALIZERS, _check_buckets, alibi_slopes, relpos_attention
from ..reference import attention as reference


class T5RelativeBias(torch.nn.Module):
    """A learned T5 bucket table [num_heads, num_buckets] (init N(0, 0.02), as in URPE's code).
    Pass `module.table` as rel_bias and `module.rel_buckets` as rel_buckets to relpos_attention;
    calling the module gives the dense bias [H, Lq, Lk] for attention ops that want one.
    Share one instance across the layers of a stack, as T5 does."""

    def __init__(self, num_heads, num_buckets=32, max_distance=128, bidirectional=True):
        super().__init__()
        _check_buckets("T5RelativeBias", num_buckets, max_distance, bidirectional)
        self.rel_buckets = (num_buckets, max_distance, bidirectional)
        self.table = torch.nn.Parameter(torch.randn(num_heads, num_buckets) * 0.02)

    def forward(self, lq, lk):
        delta = reference.relative_distance(lq, lk, self.table.device)
        return self.table[:, reference.table_index(delta, self.table.shape[1], self.rel_buckets)]

    def extra_repr(self):
        n, d, bidirectional = self.rel_buckets
        return f"heads={self.table.shape[0]}, num_buckets={n}, max_distance={d}, bidirectional={bidirectional}"


class RelPosSelfAttention(torch.nn.Module):
    """Multi-head self-attention over x [B, L, embed_dim] with relpos_attention inside.

    Args:
        embed_dim, num_heads; num_kv_heads (GQA, default num_heads).
        position: 't5' (a T5 bucket bias; pass relative_bias=T5RelativeBias(...) to share one
            across layers), 'alibi' (fixed slopes) or None.
        urpe: multiply the attention weights by a learned Toeplitz table C after the normalisation,
            indexed like the T5 bias (buckets), or by the clipped distance up to max_distance
            without 't5'. Initialised to 1, so training starts from plain attention. Pass
            post_table=<Parameter [num_heads, R]> to share one table across layers.
        normalizer: 'softmax' | 'l2'; causal; bias (of the projections).
        dropout: dropout probability on the attention weights in training mode (inside the fused
            kernels, seeded from torch's generator; see relpos_attention's dropout_p).
    forward(x, key_padding_mask=None) -> [B, L, embed_dim].
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, position="t5", relative_bias=None, urpe=False,
                 post_table=None, normalizer="softmax", causal=False, num_buckets=32, max_distance=128, bias=True,
                 dropout=0.0):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0 or num_heads % num_kv_heads != 0:
            raise ValueError("RelPosSelfAttention: num_heads must divide embed_dim and num_kv_heads must divide num_heads")
        if position not in ("t5", "alibi", None):
            raise ValueError(f"RelPosSelfAttention: position must be 't5', 'alibi' or None, got {position!r}")
        if normalizer not in NORMALIZERS:
            raise ValueError(f"RelPosSelfAttention: normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"RelPosSelfAttention: dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, embed_dim // num_heads
        self.normalizer, self.causal, self.position = normalizer, causal, position
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv_proj = torch.nn.Linear(embed_dim, 2 * num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.relative_bias = None
        if position == "t5":
            self.relative_bias = relative_bias if relative_bias is not None else T5RelativeBias(
                num_heads, num_buckets, max_distance, bidirectional=not causal)
        if position == "alibi":
            self.register_buffer("alibi", alibi_slopes(num_heads), persistent=False)
        self.post_table = None
        if urpe or post_table is not None:
            width = self.relative_bias.rel_buckets[0] if self.relative_bias is not None else 2 * max_distance + 1
            self.post_table = post_table if post_table is not None else torch.nn.Parameter(torch.ones(num_heads, width))

    def forward(self, x, key_padding_mask=None):
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).reshape(batch, length, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = relpos_attention(
            q, k, v, causal=self.causal,
            rel_bias=None if self.relative_bias is None else self.relative_bias.table,
            rel_buckets=None if self.relative_bias is None else self.relative_bias.rel_buckets,
            alibi_slopes=self.alibi if self.position == "alibi" else None,
            post_table=self.post_table, normalizer=self.normalizer, key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))
