"""The Triton attention kernels' dropout: the keep mask bit for bit the reference's hash
(fastnotes.reference.attention.dropout_keep) in the forward and the backward, the output and every
gradient against the float64 reference with the same mask, and p = 0 exactly the kernels without
dropout. Calls the launchers directly, with the diagonal vectors built as fastnotes.attention does
(under the interpreter on CPU: tiny shapes)."""
import pytest
import torch
from conftest import DEVICE, available_backends
from oracle import FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes.attention import diagonal_terms
from fastnotes.reference import attention as reference

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="needs the triton backend")
kernels = pytest.importorskip("fastnotes.kernels.triton.attention")

F64, F32 = torch.float64, torch.float32
BUCKETS = (8, 16, True)


def _launch(q, k, v, rel_bias, post_table, causal, normalizer, grad_out, **dropout):
    """(out, dq, dk, dv, d rel_bias, d post_table) from the Triton launchers; the table gradients
    fold the kernels' diagonal gradients by autograd, as the op does."""
    rel_bias = rel_bias.detach().requires_grad_()
    post_table = post_table.detach().requires_grad_()
    bias_diag, post_diag, key_bias = diagonal_terms(q, k, causal, rel_bias, BUCKETS, None, post_table, None)
    scale = q.shape[3] ** -0.5
    args = (q, k, v, bias_diag.detach(), post_diag.detach(), key_bias, scale, normalizer, causal)
    out, stat = kernels.attention_forward(*args, **dropout)
    dq, dk, dv, dbias, dpost = kernels.attention_backward(*args, out, stat, grad_out, **dropout)
    torch.autograd.backward((bias_diag, post_diag), (dbias.to(bias_diag.dtype), dpost.to(post_diag.dtype)))
    return dict(out=out, stat=stat, dq=dq, dk=dk, dv=dv, drel_bias=rel_bias.grad, dpost_table=post_table.grad)


def _reference(q, k, v, rel_bias, post_table, causal, normalizer, grad_out, dtype, p, seed):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, rel_bias, post_table)]
    q, k, v, rel_bias, post_table = leaves
    out = reference.relpos_attention(q, k, v, causal=causal, rel_bias=rel_bias, rel_buckets=BUCKETS,
                                     post_table=post_table, normalizer=normalizer, dropout_p=p, dropout_seed=seed)
    out.backward(grad_out.to(dtype))
    return dict(zip(("out", "dq", "dk", "dv", "drel_bias", "dpost_table"), [out] + [t.grad for t in leaves]))


def _case(rng, batch, heads, lq, lk, dim, dim_v):
    def draw(*shape):
        return torch.randn(*shape, generator=rng, dtype=F64)
    return (draw(batch, heads, lq, dim), draw(batch, heads, lk, dim), draw(batch, heads, lk, dim_v),
            draw(heads, BUCKETS[0]), 1.0 + 0.5 * draw(heads, BUCKETS[0]), draw(batch, heads, lq, dim_v))


@pytest.mark.parametrize("seed, p", [(0, 0.5), (2**31 - 1, 0.1), (2**31, 0.9), (2**32 - 1, 0.5), ("random", 0.1),
                                     ("random", 0.9)])
def test_keep_mask_bit_exact(rng, seed, p):
    """With v and grad_out the identity, the forward's output is A Z and the dkdv kernel's dV is
    (A Z)^T: their non-zeros are the keep mask, which must be the reference's exactly (seeds at
    the uint32 limits, several heads and batch elements: the hash wraps mod 2^32 everywhere)."""
    if seed == "random":
        seed = int(torch.randint(0, 2**32, (1,), generator=rng))
    batch, heads, length, dim = 2, 2, 24, 16
    q = torch.randn(batch, heads, length, dim, generator=rng).to(DEVICE)
    k = torch.randn(batch, heads, length, dim, generator=rng).to(DEVICE)
    eye = torch.eye(length, device=DEVICE).expand(batch, heads, length, length).contiguous()
    zeros = torch.zeros(heads, 2 * length - 1, device=DEVICE)
    key_bias = torch.zeros(batch, length, device=DEVICE)
    args = (q, k, eye, zeros, zeros + 1.0, key_bias, dim ** -0.5, "softmax", False)
    out, stat = kernels.attention_forward(*args, dropout_p=p, dropout_seed=seed)
    _, _, dv, _, _ = kernels.attention_backward(*args, out, stat, eye, dropout_p=p, dropout_seed=seed)
    keep = reference.dropout_keep(seed, batch, heads, length, length, p)
    assert torch.equal(out.cpu() != 0, keep), f"forward mask differs at seed {seed}"
    assert torch.equal(dv.cpu().transpose(-1, -2) != 0, keep), f"backward mask differs at seed {seed}"
    kept = out.cpu()[keep]
    assert kept.numel() > 0 and (kept > 0).all()


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("normalizer", ["softmax", "l2"])
def test_against_reference(rng, normalizer, causal, p):
    """Output and the gradients of q, k, v, the bias table and the URPE post table against the
    float64 reference with the same mask (several tiles each way, with tails)."""
    batch, heads, lq, lk = 1, 2, 37, 40
    q, k, v, rel_bias, post_table, grad_out = _case(rng, batch, heads, lq, lk, 16, 16)
    seed = int(torch.randint(0, 2**32, (1,), generator=rng))
    args = (q, k, v, rel_bias, post_table, causal, normalizer, grad_out)
    exact = _reference(*args, F64, p, seed)
    composite = _reference(*args, F32, p, seed)
    got = _launch(*[t.to(DEVICE, F32) for t in (q, k, v, rel_bias, post_table)], causal, normalizer,
                  grad_out.to(DEVICE, F32), dropout_p=p, dropout_seed=seed)
    for name, value in exact.items():
        summed = batch * lq * lk if name in ("drel_bias", "dpost_table") else 1
        assert_close_to_oracle(got[name], value, composite[name], FLOORS[F32], f"triton dropout {name}",
                               summed_terms=summed)


@pytest.mark.parametrize("normalizer", ["softmax", "l2"])
def test_p_zero_is_no_dropout(rng, normalizer):
    """dropout_p = 0 (any seed) runs the kernels without dropout: the same bits."""
    tensors = [t.to(DEVICE, F32) for t in _case(rng, 1, 2, 20, 33, 16, 16)]
    q, k, v, rel_bias, post_table, grad_out = tensors
    plain = _launch(q, k, v, rel_bias, post_table, True, normalizer, grad_out)
    zero = _launch(q, k, v, rel_bias, post_table, True, normalizer, grad_out, dropout_p=0.0, dropout_seed=12345)
    for name in plain:
        assert torch.equal(plain[name], zero[name]), name


def test_through_the_op_gqa_padding_unequal_lengths(rng):
    """fastnotes.relpos_attention on the triton backend passes dropout to the kernels: GQA (the mask
    follows the query head), a key padding mask and Lq < Lk with the causal offset."""
    batch, heads, kv_heads, lq, lk = 2, 2, 1, 13, 29
    q, _, _, rel_bias, post_table, grad_out = _case(rng, batch, heads, lq, lk, 16, 16)
    k = torch.randn(batch, kv_heads, lk, 16, generator=rng, dtype=F64)
    v = torch.randn(batch, kv_heads, lk, 16, generator=rng, dtype=F64)
    mask = torch.rand(batch, lk, generator=rng) < 0.8
    mask[:, -1] = True
    kwargs = dict(causal=True, rel_buckets=BUCKETS, normalizer="softmax", dropout_p=0.3,
                  dropout_seed=int(torch.randint(0, 2**32, (1,), generator=rng)))

    def run(fn, dtype, device):
        leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in (q, k, v, rel_bias, post_table)]
        out = fn(*leaves[:3], rel_bias=leaves[3], post_table=leaves[4], key_padding_mask=mask.to(device), **kwargs)
        out.backward(grad_out.to(device, dtype))
        return dict(zip(("out", "dq", "dk", "dv", "drel_bias", "dpost_table"),
                        [out.detach()] + [t.grad for t in leaves]))

    exact = run(reference.relpos_attention, F64, "cpu")
    composite = run(reference.relpos_attention, F32, "cpu")
    with fastnotes.use_backend("triton"):
        got = run(fastnotes.relpos_attention, F32, DEVICE)
    for name, value in exact.items():
        summed = batch * lq * lk if name in ("drel_bias", "dpost_table") else 1
        assert_close_to_oracle(got[name], value, composite[name], FLOORS[F32], f"triton op dropout {name}",
                               summed_terms=summed)
