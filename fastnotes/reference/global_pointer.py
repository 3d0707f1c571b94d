"""GlobalPointer + ZLPR in plain torch (docs/global_pointer.md): the float64 test oracle and the
fallback. It materialises the [B, H, n, n] scores; the fused kernels never do.

Conventions shared with the kernels:
  RoPE rotates the interleaved pairs (2m, 2m + 1) of the vector at position i by i * theta_m,
  theta_m = 10000^(-2m/d) (bert4keras's apply_rotary_position_embeddings);
  s[b, a, i, j] = <R_i q[b, i, a], R_j k[b, j, a]> / sqrt(d) + type_bias[b, i, a, 0] + type_bias[b, j, a, 1];
  allowed pairs: both tokens kept by the mask and, with tril, i <= j;
  positives: spans (start, end) with a closed end, i.e. the pair (i, j) = (start, end).
"""
import math

import torch

from .zlpr import multilabel_ce

ROPE_BASE = 10000.0


def rope_tables(n, d, dtype, device):
    """(cos, sin) [n, d/2] of the angles i * theta_m, computed in float64 then cast to dtype."""
    theta = ROPE_BASE ** (-2.0 * torch.arange(d // 2, dtype=torch.float64, device=device) / d)
    angle = torch.arange(n, dtype=torch.float64, device=device)[:, None] * theta
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, n, ..., d] with each interleaved pair (x_2m, x_2m+1) at position i rotated by
    (cos, sin)[i, m]: (x_2m cos - x_2m+1 sin, x_2m+1 cos + x_2m sin)."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (cos.shape[-1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def allowed_pairs(mask, n, tril, device):
    """bool [B or 1, 1, n, n]: pairs whose tokens are both kept and (tril) i <= j."""
    allowed = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
    if mask is not None:
        allowed = allowed & mask[:, None, :, None] & mask[:, None, None, :]
    if tril:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).triu()
    return allowed


def scores(q, k, mask=None, rope=True, tril=True, type_bias=None):
    """The dense scores [B, H, n, n] with -inf on the pairs that are not allowed. q, k [B, n, H, d]
    (or [B, n, d] shared with type_bias [B, n, H, 2]). Works in q's dtype (float32 for 16-bit)."""
    work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    q, k = q.to(work), k.to(work)
    if q.dim() == 3:
        q, k = q[:, :, None], k[:, :, None]
    n, d = q.shape[1], q.shape[-1]
    if rope:
        cos, sin = rope_tables(n, d, work, q.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    if type_bias is not None:
        bias = type_bias.to(work)
        s = s + bias[..., 0].transpose(1, 2)[..., :, None] + bias[..., 1].transpose(1, 2)[..., None, :]
    return s.masked_fill(~allowed_pairs(mask, n, tril, q.device), -math.inf)


def span_targets(spans, n):
    """{0, 1} targets [B, H, n * n] (float64) from spans [B, H, P, 2] padded with -1."""
    batch, heads = spans.shape[:2]
    valid = spans[..., 0] >= 0
    index = torch.where(valid, spans[..., 0] * n + spans[..., 1], 0).reshape(batch, heads, -1).long()
    targets = torch.zeros(batch, heads, n * n, dtype=torch.float64, device=spans.device)
    return targets.scatter_add_(-1, index, valid.reshape(batch, heads, -1).double())


def global_pointer_loss(q, k, spans, mask=None, rope=True, tril=True, type_bias=None, reduction="mean"):
    """Reference loss: the dense scores, then ZLPR over each (sample, type) row of n * n pairs with
    the negatives summed directly (multilabel_ce excludes the -inf pairs). Arguments are assumed
    valid (fastnotes.global_pointer_loss checks them). Plain torch autograd."""
    s = scores(q, k, mask, rope, tril, type_bias)
    batch, heads, n = s.shape[:3]
    return multilabel_ce(s.reshape(batch, heads, n * n), span_targets(spans, n).to(s.dtype), None, reduction)


def global_pointer_decode(q, k, mask=None, threshold=0.0, rope=True, tril=True, type_bias=None):
    """int64 [M, 4] (batch, type, start, end) of the allowed pairs with score > threshold, sorted."""
    with torch.no_grad():
        return (scores(q, k, mask, rope, tril, type_bias) > threshold).nonzero()
