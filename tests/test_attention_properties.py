"""Property tests (hypothesis) for relpos_attention against the float64 reference: shapes (Lq != Lk,
GQA/MQA, head dims), strides, dtypes, scales, T5 bucket settings, clipped tables, ALiBi, URPE,
padding (fully masked rows), causal masks and extreme biases; bad input names its argument.
The Triton interpreter runs only tiny shapes (it pays per program instance)."""
import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from oracle import PROPERTY_FLOORS, assert_close_to_oracle, property_settings

import fastnotes
from fastnotes.reference import attention as reference

F64 = torch.float64
BACKENDS = available_backends()
SETTINGS = property_settings(25)


@st.composite
def cases(draw, backend):
    tiny = backend == "triton"
    kv_heads = draw(st.integers(1, 2))
    case = dict(
        batch=draw(st.integers(1, 2)), kv_heads=kv_heads,
        heads=kv_heads * draw(st.sampled_from([1, 2] if tiny else [1, 2, 3])),
        lq=draw(st.integers(1, 20 if tiny else 80)), lk=draw(st.integers(1, 20 if tiny else 300)),
        dim=draw(st.integers(1, 16 if tiny else 40)), dim_v=draw(st.integers(1, 16 if tiny else 40)),
        causal=draw(st.booleans()), normalizer=draw(st.sampled_from(["softmax", "l2"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 3.0))),
        bias=draw(st.sampled_from(["none", "t5", "clip", "alibi"])), urpe=draw(st.booleans()),
        buckets=draw(st.booleans()),  # how a URPE table is indexed without a T5 or clipped bias
        padding=draw(st.sampled_from(["none", "random", "one row empty"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        dtype=torch.float32 if tiny else draw(st.sampled_from([F64, torch.float32])),
        seed=draw(st.integers(0, 2**31 - 1)))
    # T5 settings: num_buckets >= 4 (2 causal), max_distance beyond the exact range
    bidirectional = draw(st.booleans())
    num_buckets = draw(st.integers(4 if bidirectional else 2, 40))
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    case["rel_buckets"] = (num_buckets, draw(st.integers(max_exact + 1, max_exact + 200)), bidirectional)
    case["half_width"] = draw(st.integers(0, 12))  # clipped table of width 2P + 1
    # extreme biases (scores in the thousands) on the float64 path; float32 keeps its rounding small
    case["bias_size"] = draw(st.sampled_from([0.5, 5.0, 1e3] if case["dtype"] == F64 else [0.5, 5.0]))
    return case


def _layout(x, layout, gen):
    """x [B, H, L, D] as a non-contiguous tensor with the same values."""
    if layout == "transposed":  # [B, L, H, D] storage, as after a projection
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # every other entry of a wider last dimension
        wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], generator=gen, dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    b, h, hk = case["batch"], case["heads"], case["kv_heads"]
    tensors = {"q": randn(b, h, case["lq"], case["dim"]), "k": randn(b, hk, case["lk"], case["dim"]),
               "v": randn(b, hk, case["lk"], case["dim_v"])}
    kwargs = dict(causal=case["causal"], normalizer=case["normalizer"], scale=case["scale"])
    width = 2 * case["half_width"] + 1
    if case["bias"] == "t5" or (case["urpe"] and case["bias"] in ("none", "alibi") and case["buckets"]):
        kwargs["rel_buckets"] = case["rel_buckets"]
        width = case["rel_buckets"][0]
    if case["bias"] in ("t5", "clip"):
        tensors["rel_bias"] = randn(h, width) * case["bias_size"]
    if case["bias"] == "alibi":
        tensors["alibi_slopes"] = torch.rand(h, generator=gen, dtype=F64) * case["bias_size"]
    if case["urpe"]:
        tensors["post_table"] = torch.rand(h, width, generator=gen, dtype=F64) * 3 - 1  # signed C
    if case["padding"] != "none":
        mask = torch.rand(b, case["lk"], generator=gen) < 0.7
        if case["padding"] == "one row empty":
            mask[-1] = False
        kwargs["key_padding_mask"] = mask
    upstream = randn(b, h, case["lq"], case["dim_v"])
    return tensors, kwargs, upstream, gen


def run(fn, tensors, kwargs, upstream, dtype, layout=None, gen=None):
    leaves = {n: t.detach().to(dtype).clone().requires_grad_() for n, t in tensors.items()}
    args = {n: (_layout(t, layout, gen).to(DEVICE) if layout and n in "qkv" else t.to(DEVICE))
            for n, t in leaves.items()}
    kw = {n: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    out = fn(**args, **kw)
    out.backward(upstream.to(dtype=out.dtype, device=out.device))
    return {"out": out.detach().cpu(), **{f"d{n}": t.grad for n, t in leaves.items()}}


def score_gradient_size(tensors, upstream, out):
    """The size of the terms of dS = a (C dP - D) (docs/attention.md): the table and slope gradients
    sum dS over pairs, and carry rounding of that size even where the terms cancel to 0 (one key, or
    the l2 normaliser of one weight: no gradient at all)."""
    q, v = tensors["q"], tensors["v"]
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    dp = (upstream @ v.transpose(-1, -2)).abs().max()
    row_dot = (upstream * out).sum(-1).abs().max()
    post = tensors["post_table"].abs().max() if "post_table" in tensors else 1.0
    return max(1.0, (post * dp + row_dot).item())


def cancelled_size(tensors, upstream, out, kwargs):
    """dq and dk sum scale dS k, scale dS q: rounding of the size of those terms, as above."""
    q, k = tensors["q"], tensors["k"]
    scale = kwargs["scale"] or q.shape[-1] ** -0.5
    return max(1.0, scale * score_gradient_size(tensors, upstream, out) * max(q.abs().max(), k.abs().max()).item())


def check(backend, case):
    tensors, kwargs, upstream, gen = build(case)
    dtype = case["dtype"]
    exact = run(reference.relpos_attention, tensors, kwargs, upstream, F64)
    composite = run(reference.relpos_attention, tensors, kwargs, upstream, dtype)
    with fastnotes.use_backend(backend):
        got = run(fastnotes.relpos_attention, tensors, kwargs, upstream, dtype, case["layout"], gen)
    assert got["out"].dtype == dtype
    # a = exp(s - stat) carries the rounding of the scores: relative eps |s|
    floor = PROPERTY_FLOORS[dtype] * (1 + case["bias_size"] if dtype == F64 else 1)
    pairs = case["batch"] * case["lq"] * case["lk"]  # terms a table or slope gradient entry sums, at most
    for name in exact:
        summed = pairs if name in ("drel_bias", "dpost_table", "dalibi_slopes") and dtype != F64 else 1
        size = 1.0
        if name in ("dq", "dk"):
            size = cancelled_size(tensors, upstream, exact["out"], kwargs)
        elif name == "drel_bias":
            size = score_gradient_size(tensors, upstream, exact["out"])
        elif name == "dalibi_slopes":  # dS times the distance i - j
            size = score_gradient_size(tensors, upstream, exact["out"]) * (case["lq"] + case["lk"])
        assert_close_to_oracle(got[name], exact[name], composite[name], floor * size, f"{backend} {name}",
                               summed_terms=summed)
    if case["padding"] == "one row empty":  # every key of the last batch row padded: 0, and no NaN
        assert torch.equal(got["out"][-1], torch.zeros_like(got["out"][-1]))
    if case["causal"] and case["lq"] > case["lk"]:  # the first Lq - Lk rows see no key
        assert torch.equal(got["out"][:, :, :case["lq"] - case["lk"]],
                           torch.zeros_like(got["out"][:, :, :case["lq"] - case["lk"]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend):
    # no shrinking under the Triton interpreter: minutes per failure; the failing case is printed
    @settings(SETTINGS, phases=[Phase.generate] if backend == "triton" else settings.default.phases)
    @given(case=cases(backend))
    def inner(case):
        check(backend, case)

    inner()


ARGUMENTS = ["q", "k", "v", "key_padding_mask", "rel_bias", "post_table", "alibi_slopes"]


@SETTINGS
@given(name=st.sampled_from(ARGUMENTS), axis=st.integers(0, 3), extra=st.integers(1, 3),
       wrong_dtype=st.booleans())
def test_bad_input_names_the_argument(name, axis, extra, wrong_dtype):
    """One argument gets a wrong size along one axis, or a wrong dtype: a ValueError/TypeError that
    names it, before any kernel runs."""
    good = dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 3),
                key_padding_mask=torch.ones(2, 6, dtype=torch.bool), rel_bias=torch.randn(4, 7),
                post_table=torch.randn(4, 7), alibi_slopes=torch.rand(4))
    bad = good[name]
    if wrong_dtype:
        bad = bad.to(torch.float32 if name == "key_padding_mask" else torch.int32)
    else:
        axis %= bad.dim()
        # still valid: another Lq, another value head dim, another odd table width
        assume((name, axis) not in (("q", 2), ("v", 3), ("rel_bias", 1), ("post_table", 1)))
        assume(not (name == "q" and axis == 1 and extra % 2 == 0))  # 6 heads fit k's 2 (the tables say no)
        shape = list(bad.shape)
        shape[axis] += extra
        bad = torch.zeros(shape, dtype=bad.dtype)
    with pytest.raises((ValueError, TypeError)) as info:
        fastnotes.relpos_attention(**{**good, name: bad})
    assert f" {name} " in str(info.value).replace(",", " "), str(info.value)
