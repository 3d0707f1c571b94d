"""Self-check cases for relative-position attention (T5 bias + URPE, softmax and l2, attention dropout)."""
import torch

from ..attention import relpos_attention
from ..reference import attention as reference_attention
from ._common import fresh_generator

_RELB = (32, 128, True)


def _inputs(gen, batch, heads, kv_heads, length, dim):
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return [randn(batch, heads, length, dim), randn(batch, kv_heads, length, dim), randn(batch, kv_heads, length, dim),
            randn(heads, 32) * 0.5, 1 + 0.2 * randn(heads, 32)]


def _scaled_error(got, exact):
    return (got.double().cpu() - exact).abs().max().item() / max(1.0, exact.abs().max().item())


def _relpos_attention_check(device, dtype):
    """Errors are scaled by max(1, largest oracle value) per tensor: the table gradients sum
    B x L x L terms and grow with the size."""
    gen = fresh_generator()
    values = _inputs(gen, 2, 4, 2, 96, 16)
    mask = torch.rand(2, 96, generator=gen) < 0.9
    errors = {"value_error": 0.0, "grad_error": 0.0}
    for causal, normalizer, dropout_p in ((False, "softmax", 0.0), (True, "l2", 0.2)):
        kwargs = dict(causal=causal, normalizer=normalizer, rel_buckets=_RELB, dropout_p=dropout_p, dropout_seed=7)
        upstream = torch.randn(2, 4, 96, 16, generator=gen, dtype=torch.float64)
        exact_in = [t.detach().clone().requires_grad_() for t in values]
        exact = reference_attention.relpos_attention(*exact_in[:3], rel_bias=exact_in[3], post_table=exact_in[4],
                                                     key_padding_mask=mask, **kwargs)
        exact.backward(upstream)
        got_in = [t.detach().clone().to(device=device, dtype=dtype).requires_grad_() for t in values]
        got = relpos_attention(*got_in[:3], rel_bias=got_in[3], post_table=got_in[4], key_padding_mask=mask.to(device),
                               **kwargs)
        got.backward(upstream.to(device=device, dtype=dtype))
        errors["value_error"] = max(errors["value_error"], _scaled_error(got, exact.detach()))
        for g, e in zip(got_in, exact_in):
            errors["grad_error"] = max(errors["grad_error"], _scaled_error(g.grad, e.grad))
    return errors


def _relpos_attention_timing(device):
    gen = torch.Generator().manual_seed(0)
    q, k, v, table, post = (t.float().to(device) for t in _inputs(gen, 2, 8, 8, 512, 64))
    delta = reference_attention.relative_distance(512, 512, device)
    index = reference_attention.table_index(delta, 32, _RELB)

    def grads(fn):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, table, post)]
        torch.autograd.grad(fn(*leaves).sum(), leaves)

    def fused():
        grads(lambda q, k, v, t, c: relpos_attention(q, k, v, rel_bias=t, rel_buckets=_RELB, post_table=c))

    def composite():  # the naive composite: materialised bias and C, softmax, multiply after it
        grads(lambda q, k, v, t, c: torch.softmax(q @ k.transpose(-1, -2) / 8 + t[:, index], -1) * c[:, index] @ v)

    return {"shape": "2x8x512x64 T5+URPE fp32 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"relpos_attention": (_relpos_attention_check, _relpos_attention_timing)}
