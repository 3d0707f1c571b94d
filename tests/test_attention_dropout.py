"""relpos_attention's attention dropout (dropout_p, dropout_seed) on the CPU backends: against the
float64 reference with the same hash mask (forward and every gradient), the mask's statistics,
unbiasedness, seeding, the launcher's per-batch-element chunks, and bad input. The Triton kernels:
tests/test_attention_dropout_triton.py."""
import pytest
import torch
from conftest import available_backends
from oracle import FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes.reference import attention as reference

F64 = torch.float64
CPU_BACKENDS = [b for b in available_backends() if b in ("numba", "reference")]


def make_case(gen, batch=2, heads=4, kv_heads=2, lq=70, lk=90, dim=16, dim_v=8):
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    tensors = {"q": randn(batch, heads, lq, dim), "k": randn(batch, kv_heads, lk, dim),
               "v": randn(batch, kv_heads, lk, dim_v), "rel_bias": randn(heads, 16) * 0.5,
               "post_table": torch.rand(heads, 16, generator=gen, dtype=F64) * 2 - 0.5}
    mask = torch.rand(batch, lk, generator=gen) < 0.8
    mask[:, 0] = True
    return tensors, {"rel_buckets": (16, 20, True), "key_padding_mask": mask}


def run(fn, tensors, kwargs, upstream, dtype):
    leaves = {n: t.to(dtype).clone().requires_grad_() for n, t in tensors.items()}
    out = fn(**leaves, **kwargs)
    out.backward(upstream.to(out.dtype))
    return {"out": out.detach(), **{f"d{n}": t.grad for n, t in leaves.items()}}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("normalizer", ["softmax", "l2"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_against_reference_with_the_same_mask(rng, backend, dtype, normalizer, causal):
    """Several forward/backward tiles (Lq, Lk above the numba tile sizes), GQA, padding, URPE, T5 bias."""
    tensors, kwargs = make_case(rng, lq=300, lk=333)
    kwargs.update(normalizer=normalizer, causal=causal, dropout_p=0.3, dropout_seed=int(torch.randint(2 ** 32, (),
                                                                                               generator=rng)))
    upstream = torch.randn(2, 4, 300, 8, generator=rng, dtype=F64)
    exact = run(reference.relpos_attention, tensors, kwargs, upstream, F64)
    composite = run(reference.relpos_attention, tensors, kwargs, upstream, dtype)
    with fastnotes.use_backend(backend):
        got = run(fastnotes.relpos_attention, tensors, kwargs, upstream, dtype)
    undropped = run(reference.relpos_attention, tensors, {**kwargs, "dropout_p": 0.0}, upstream, F64)
    assert (exact["out"] - undropped["out"]).abs().max() > 0.1  # the mask is not a no-op
    for name in exact:
        summed = 2 * 300 * 333 if name in ("drel_bias", "dpost_table") and dtype != F64 else 1
        assert_close_to_oracle(got[name].cpu(), exact[name], composite[name].cpu(), FLOORS[dtype],
                               f"{backend} {name}", summed_terms=summed)


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba's launcher")
@pytest.mark.parametrize("lq", [1, 70])
def test_numba_chunks_serial_path_and_single_query(rng, monkeypatch, lq):
    """The per-batch-element chunks (head-interleaved inputs), the serial forward and Lq = 1 under
    no_grad (which must not take the dropout-free single-query path) all draw the reference's mask."""
    from fastnotes.kernels.numba import attention as kernels
    tensors, kwargs = make_case(rng, batch=3, lq=lq)
    kwargs.update(causal=True, dropout_p=0.5, dropout_seed=99)
    exact = reference.relpos_attention(**tensors, **kwargs)
    interleaved = {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if n in "qkv" else t).float()
                   for n, t in tensors.items()}
    for chunk_bytes, serial_work in ((0, 0), (1 << 62, 1 << 62)):
        monkeypatch.setattr(kernels, "CHUNKED_COPY_BYTES", chunk_bytes)
        monkeypatch.setattr(kernels, "SERIAL_FORWARD_WORK", serial_work)
        with fastnotes.use_backend("numba"), torch.no_grad():
            got = fastnotes.relpos_attention(**interleaved, **kwargs)
        torch.testing.assert_close(got.double(), exact, rtol=2e-5, atol=2e-5)


def test_mask_statistics():
    """The hash keeps 1 - p of the weights, independently across neighbouring keys, rows and heads."""
    p = 0.3
    keep = reference.dropout_keep(2024, 4, 8, 128, 256, p).double()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    for pair in (keep[..., 1:] * keep[..., :-1], keep[:, :, 1:] * keep[:, :, :-1], keep[:, 1:] * keep[:, :-1]):
        both = pair.mean().item()  # P(both kept) = (1 - p)^2 when independent
        assert abs(both - (1 - p) ** 2) < 5 * (both * (1 - both) / pair.numel()) ** 0.5
    other = reference.dropout_keep(2025, 4, 8, 128, 256, p).double()
    assert abs((keep * other).mean().item() - (1 - p) ** 2) < 0.01  # another seed: another mask


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="the numba kernels (the reference is the same formula)")
def test_unbiased_over_seeds(rng):
    """E[output] over seeds is the dropout-free output (kept weights scaled by 1 / (1 - p); without
    the scale the mean would be off by half the output)."""
    backend = "numba"
    tensors, kwargs = make_case(rng, batch=1, heads=2, kv_heads=2, lq=8, lk=12)
    clean = reference.relpos_attention(**tensors, **kwargs)
    with fastnotes.use_backend(backend), torch.no_grad():
        mean = sum(fastnotes.relpos_attention(**tensors, **kwargs, dropout_p=0.5, dropout_seed=s)
                   for s in range(2000)) / 2000
    spread = (clean.abs().max() * 2).item()
    assert (mean - clean).abs().max().item() < 0.15 * spread


def test_seed_drawn_from_torch_generator(rng):
    tensors, kwargs = make_case(rng, batch=1, lq=20, lk=20)
    tensors = {n: t.float() for n, t in tensors.items()}
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(fastnotes.relpos_attention(**tensors, **kwargs, dropout_p=0.4))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert torch.equal(fastnotes.relpos_attention(**tensors, **kwargs, dropout_p=0.0),
                       fastnotes.relpos_attention(**tensors, **kwargs))


@pytest.mark.parametrize("change, words", [
    ({"dropout_p": 1.0}, "dropout_p"), ({"dropout_p": -0.1}, "dropout_p"), ({"dropout_p": "0.1"}, "dropout_p"),
    ({"dropout_p": True}, "dropout_p"), ({"dropout_seed": -1}, "dropout_seed"),
    ({"dropout_seed": 2 ** 32}, "dropout_seed"), ({"dropout_seed": 1.5}, "dropout_seed")])
def test_bad_dropout_arguments(change, words):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=words):
        fastnotes.relpos_attention(q, q, q, **{"dropout_p": 0.1, **change})


def test_self_attention_module_dropout():
    """RelPosSelfAttention(dropout=p): dropout in training mode only, repeatable under manual_seed."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    layer = fastnotes.RelPosSelfAttention(16, 4, dropout=0.5)
    plain = fastnotes.RelPosSelfAttention(16, 4, relative_bias=layer.relative_bias)
    plain.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first)
    assert not torch.allclose(first, plain(x))
    torch.testing.assert_close(layer.eval()(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout"):
        fastnotes.RelPosSelfAttention(16, 4, dropout=1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_activation_checkpointing_recomputes_the_same_mask(rng, backend):
    """torch.utils.checkpoint restores the RNG state before recomputing the forward, so a drawn seed
    (dropout_seed=None) is drawn again identically: gradients equal the plain run's."""
    from torch.utils.checkpoint import checkpoint
    tensors, kwargs = make_case(rng, batch=1, lq=40, lk=40)
    kwargs.update(dropout_p=0.3)
    grads = []
    for checkpointed in (False, True):
        leaves = {n: t.float().clone().requires_grad_() for n, t in tensors.items()}
        torch.manual_seed(3)

        def fn(q, k, v, rel_bias, post_table):
            return fastnotes.relpos_attention(q, k, v, rel_bias=rel_bias, post_table=post_table, **kwargs).square()

        with fastnotes.use_backend(backend):
            out = checkpoint(fn, *leaves.values(), use_reentrant=False) if checkpointed else fn(*leaves.values())
            out.sum().backward()
        grads.append([t.grad for t in leaves.values()])
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


def test_autocast_bfloat16_with_dropout(rng):
    """Under CPU autocast the op runs in bfloat16 inputs (float32 accumulation) with the same mask."""
    tensors, kwargs = make_case(rng, batch=1, lq=30, lk=30)
    kwargs.update(dropout_p=0.25, dropout_seed=11)
    exact = reference.relpos_attention(**{n: t.to(torch.bfloat16).double() if n in "qkv" else t
                                          for n, t in tensors.items()}, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastnotes.relpos_attention(**{n: t.float() for n, t in tensors.items()}, **kwargs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=2e-2)
