"""Property tests (hypothesis) for ladder_merge against the float64 reference: leading shapes, widths
across tile boundaries (and the numba threaded path), strides, dtypes, temperatures, saturated gates,
no bias, no gate, a trainable h; bad input names its argument. The Triton interpreter runs only
small shapes."""
import re

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from oracle import LST_FLOORS, assert_close_to_oracle, property_settings

import fastnotes
from fastnotes import reference

F64 = torch.float64
BACKENDS = available_backends()
SETTINGS = property_settings(25)


@st.composite
def cases(draw, backend):
    tiny = backend == "triton"
    lead = draw(st.lists(st.integers(1, 5), max_size=2))
    rows = draw(st.integers(1, 70 if tiny else 1200))  # numba: threads from N d >= 2^16
    return dict(
        lead=lead + [rows], d=draw(st.integers(1, 70 if tiny else 80)), D=draw(st.integers(1, 40 if tiny else 100)),
        gated=draw(st.booleans()), bias=draw(st.booleans()), h_grad=draw(st.booleans()),
        alpha=draw(st.one_of(st.floats(-1, 1), st.sampled_from([-30.0, 30.0]))),  # 30 / T: a saturated gate
        temperature=draw(st.sampled_from([0.1, 0.013, 1.0, 7.5])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        dtype=torch.float32 if tiny else draw(st.sampled_from([F64, torch.float32, torch.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)))


def _layout(x, layout):
    """x [..., n] as a non-contiguous tensor with the same values (a leaf of its own)."""
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced":
        x = torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    return x


def run(case, inputs, dtype, op):
    s, h, w, b, alpha, g = inputs
    leaves = [x.detach().to(dtype).clone().requires_grad_() if x is not None else None for x in (s, w, b)]
    alpha = alpha.detach().clone().requires_grad_() if alpha is not None else None  # float32 or float64
    h = h.detach().to(dtype).clone().requires_grad_(case["h_grad"])
    wrt = [x for x in (*leaves, alpha, h) if x is not None and x.requires_grad]
    s_, h_ = (_layout(x, case["layout"]) for x in (leaves[0], h))
    out = op(s_.to(DEVICE), h_.to(DEVICE), leaves[1].to(DEVICE), None if leaves[2] is None else leaves[2].to(DEVICE),
             None if alpha is None else alpha.to(DEVICE), case["temperature"])
    grads = torch.autograd.grad(out, wrt, g.to(dtype=out.dtype, device=out.device))
    return out.detach().cpu(), [x.cpu() for x in grads]


def fused(s, h, w, b, alpha, temperature):
    return fastnotes.ladder_merge(s, h, w, b, alpha, temperature=temperature)


def check(backend, case):
    gen = torch.Generator().manual_seed(case["seed"])
    d, D = case["d"], case["D"]
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    s, h, g = randn(*case["lead"], d), randn(*case["lead"], D), randn(*case["lead"], d)
    w, b = randn(d, D) / D ** 0.5, randn(d) if case["bias"] else None
    alpha = torch.tensor(case["alpha"], dtype=F64) if case["gated"] else None
    dtype = case["dtype"]
    alpha_dtype = F64 if dtype == F64 else torch.float32
    inputs = (s, h, w, b, alpha, g)
    exact_out, exact_grads = run(case, inputs, F64, reference.lst.ladder_merge)
    work = (s, h, w, b, None if alpha is None else alpha.to(alpha_dtype), g)
    comp_out, comp_grads = run(case, work, dtype, reference.lst.ladder_merge)
    with fastnotes.use_backend(backend):
        out, grads = run(case, work, dtype, fused)
    assert out.dtype == dtype and out.shape == exact_out.shape
    # dalpha sums g (s - z) over every entry: it carries rounding of the size of those terms
    T = case["temperature"]
    mu = torch.sigmoid(alpha / T) if alpha is not None else torch.tensor(0.0, dtype=F64)
    z = h @ w.T + (b if b is not None else 0)
    alpha_terms = (mu * (1 - mu) / T * (g.abs() * (s.abs() + h.abs() @ w.abs().T + z.abs())).sum()).item()
    floor = LST_FLOORS[dtype]
    names = ["ds", "dW"] + (["db"] if b is not None else []) + (["dalpha"] if alpha is not None else []) + \
        (["dh"] if case["h_grad"] else [])
    for name, got, exact, comp in zip(["out"] + names, [out, *grads], [exact_out, *exact_grads],
                                      [comp_out, *comp_grads]):
        assert_close_to_oracle(got, exact, comp, floor, f"{backend} {name}",
                               terms=alpha_terms if name == "dalpha" else 0.0, roundoff=8 * floor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend):
    @settings(SETTINGS, phases=[Phase.generate] if backend == "triton" else settings.default.phases)
    @given(case=cases(backend))
    def inner(case):
        if backend == "triton":
            assume(case["dtype"] == torch.float32)
        check(backend, case)

    inner()


ARGUMENTS = ["s", "h", "weight", "bias", "alpha"]


@SETTINGS
@given(name=st.sampled_from(ARGUMENTS), axis=st.integers(0, 2), extra=st.integers(1, 3),
       wrong_dtype=st.booleans())
def test_bad_input_names_the_argument(name, axis, extra, wrong_dtype):
    """One argument gets a wrong size along one axis, or an integer dtype: a ValueError/TypeError
    that names it, before any kernel runs."""
    good = dict(s=torch.randn(2, 3, 4), h=torch.randn(2, 3, 6), weight=torch.randn(4, 6), bias=torch.randn(4),
                alpha=torch.zeros(()))
    bad = good[name]
    if wrong_dtype:
        bad = bad.to(torch.int64)
    else:
        shape = list(bad.shape) or [1]
        shape[axis % len(shape)] += extra
        # still valid: other leading dims of s with h alike, or an alpha of one value
        assume(name != "s" or axis % 3 == 2)
        bad = torch.zeros(shape)
    with pytest.raises((ValueError, TypeError)) as info:
        fastnotes.ladder_merge(**{**good, name: bad})
    assert re.search(rf"\b{name}\b", str(info.value)), str(info.value)
