"""Property tests (hypothesis) for expected_accuracy / exact_loss against the float64 reference:
shapes, strides, dtypes, ignored rows, ties, extreme and infinite logits, sigma as a float or a
tensor [] / [1] / [B] (with its gradient, zeros included), margin and nodes, on every backend; bad
arguments raise errors that name them. The Triton interpreter runs only tiny shapes."""
import math

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import given
from hypothesis import strategies as st
from oracle import EXACT_FLOORS, assert_close_to_oracle, property_settings

import fastnotes
from fastnotes.exact import gauss_hermite
from fastnotes.reference import exact as reference

F64 = torch.float64
BACKENDS = available_backends()
SETTINGS = property_settings(30)


@st.composite
def cases(draw, backend):
    tiny = backend == "triton"
    dtypes = [torch.float32] if tiny else [torch.float32, F64, torch.float16, torch.bfloat16]
    return dict(
        rows=draw(st.integers(1, 3 if tiny else 6)), classes=draw(st.integers(1, 70 if tiny else 150)),
        dtype=draw(st.sampled_from(dtypes)),
        nodes=draw(st.sampled_from([16, 32, 64] if tiny else [7, 16, 32, 64])),
        sigma_kind=draw(st.sampled_from(["float", "scalar", "one", "rows"])),
        sigma_log=draw(st.floats(math.log(0.05), math.log(5.0))), some_zero_sigma=draw(st.booleans()),
        margin=draw(st.one_of(st.none(), st.floats(0.1, 3.0))),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        extremes=draw(st.sampled_from(["none", "1e4", "inf", "ties"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        ignored=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    rows, classes = case["rows"], case["classes"]
    logits = torch.randn(rows, classes, generator=gen, dtype=F64) * case["scale"]
    labels = torch.randint(0, classes, (rows,), generator=gen)
    pick = torch.rand(rows, classes, generator=gen) < 0.2
    if case["extremes"] == "1e4":
        signs = torch.sign(torch.randn(rows, classes, generator=gen, dtype=F64))
        logits = torch.where(pick, signs * 1e4, logits)
    elif case["extremes"] == "inf":  # mostly -inf (masked classes), sometimes +inf
        value = torch.where(torch.rand(rows, classes, generator=gen) < 0.8, -math.inf, math.inf).to(F64)
        logits = torch.where(pick, value, logits)
    elif case["extremes"] == "ties":  # competitors equal to the label's logit
        logits = torch.where(pick, logits.gather(1, labels[:, None]), logits)
    logits = logits.to(case["dtype"]).double()  # values the tested dtype holds exactly
    if case["ignored"]:
        labels[torch.rand(rows, generator=gen) < 0.4] = -100
    spread = 0.5 * torch.randn(rows, generator=gen, dtype=F64)
    sigma = torch.exp(torch.tensor(case["sigma_log"], dtype=F64) + spread)
    if case["some_zero_sigma"] and case["sigma_kind"] == "rows":
        sigma[0] = 0.0  # the hard-argmax limit in one row
    kinds = {"float": sigma[0].item(), "scalar": sigma[0], "one": sigma[:1], "rows": sigma}
    sigma = kinds[case["sigma_kind"]]
    upstream = torch.randn(rows, generator=gen, dtype=F64)
    return logits, labels, sigma, upstream, gen


def layout(x, kind, gen):
    """x [B, C] as a non-contiguous tensor with the same values."""
    if kind == "transposed":
        return x.T.contiguous().T
    if kind == "sliced":
        wide = torch.randn(x.shape[0], 2 * x.shape[1], generator=gen).to(x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def evaluate(fn, logits, labels, sigma, upstream, dtype, compute_dtype, kind="contiguous", gen=None):
    """(P, dP/dlogits, dP/dsigma) with the upstream gradient, through fn(x, labels, sigma)."""
    x = logits.to(dtype).clone().requires_grad_()
    sig = sigma.to(compute_dtype).clone().requires_grad_() if isinstance(sigma, torch.Tensor) else sigma
    prob = fn(layout(x, kind, gen).to(DEVICE), labels.to(DEVICE),
              sig.to(DEVICE) if isinstance(sig, torch.Tensor) else sig)
    prob.backward(upstream.to(device=prob.device, dtype=prob.dtype))
    return {"P": prob.detach().cpu().double(), "dlogits": x.grad.double(),
            "dsigma": sig.grad.double() if isinstance(sig, torch.Tensor) else None}


def reference_fn(nodes, margin):
    t, w = gauss_hermite(nodes)

    def fn(x, labels, sigma):
        compute = F64 if x.dtype == F64 else torch.float32
        rows = (sigma if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=compute))
        rows = rows.to(compute).reshape(-1).expand(x.shape[0])
        return reference.expected_accuracy(x, torch.where(labels == -100, -1, labels), rows, margin, t, w)

    return fn


def check(backend, case):
    logits, labels, sigma, upstream, gen = build(case)
    dtype = case["dtype"]
    compute = F64 if dtype == F64 else torch.float32
    ref = reference_fn(case["nodes"], case["margin"])
    exact = evaluate(ref, logits, labels, sigma, upstream, F64, F64)
    composite = evaluate(ref, logits, labels, sigma, upstream, dtype, compute)
    with fastnotes.use_backend(backend):
        got = evaluate(lambda x, y, s: fastnotes.expected_accuracy(x, y, sigma=s, margin=case["margin"],
                                                                   nodes=case["nodes"]),
                       logits, labels, sigma, upstream, dtype, compute, case["layout"], gen)
    assert got["P"].shape == (case["rows"],)
    kept = labels != -100
    assert (got["P"][~kept] == 1).all() and (got["dlogits"][~kept] == 0).all(), "ignored rows take no part"
    assert (got["dlogits"][torch.isinf(logits)] == 0).all(), "no gradient reaches an infinite logit"
    for name in ("P", "dlogits", "dsigma"):
        if exact[name] is not None:
            assert_close_to_oracle(got[name], exact[name], composite[name], EXACT_FLOORS[compute],
                                   f"{backend} {name}", same_nonfinite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend):
    @SETTINGS
    @given(case=cases(backend))
    def inner(case):
        check(backend, case)

    inner()


BAD_ARGUMENTS = [
    ("logits", torch.zeros(3, 4, dtype=torch.int64), TypeError), ("logits", torch.zeros(3), ValueError),
    ("logits", torch.zeros(3, 4, 2), ValueError), ("logits", [[0.0] * 4] * 3, TypeError),
    ("logits", torch.zeros(3, 0), ValueError),
    ("target", torch.tensor([0.0, 1.0, 2.0]), TypeError), ("target", torch.tensor([0, 1]), ValueError),
    ("target", torch.tensor([0, 4, 1]), ValueError), ("target", torch.tensor([0, -1, 1]), ValueError),
    ("sigma", -0.5, ValueError), ("sigma", math.nan, ValueError), ("sigma", math.inf, ValueError),
    ("sigma", "0.5", ValueError), ("sigma", True, ValueError),
    ("sigma", torch.tensor([1, 2, 3]), TypeError),
    ("sigma", torch.ones(2), ValueError), ("sigma", torch.tensor([0.5, -1e-30, 0.5]), ValueError),
    ("sigma", torch.tensor([0.5, math.nan, 0.5]), ValueError),
    ("sigma", torch.tensor(math.inf), ValueError),
    ("sigma", torch.ones(3, device="meta"), ValueError),
    ("margin", 0.0, ValueError), ("margin", -1.0, ValueError), ("margin", math.nan, ValueError),
    ("margin", True, ValueError), ("margin", torch.tensor(1.0), ValueError),
    ("nodes", 1, ValueError), ("nodes", 129, ValueError), ("nodes", 32.0, ValueError),
    ("nodes", True, ValueError),
    ("reduction", "avg", ValueError), ("aggregation", "median", ValueError),
]


CALLS = [(entry, *bad) for entry in ("exact_loss", "expected_accuracy") for bad in BAD_ARGUMENTS
         if entry == "exact_loss" or bad[0] not in ("reduction", "aggregation")]


@pytest.mark.parametrize("entry, name, value, error", CALLS, ids=lambda v: repr(v)[:24])
def test_bad_input_names_the_argument(entry, name, value, error):
    """Every bad argument, alone among good ones: a ValueError/TypeError that names it."""
    kwargs = dict(sigma=0.5, margin=None, nodes=32)
    if entry == "exact_loss":
        kwargs.update(reduction="mean", aggregation="mean")
    call = dict(logits=torch.randn(3, 4), target=torch.tensor([0, 3, -100]), **kwargs)
    call[name] = value
    logits, target = call.pop("logits"), call.pop("target")
    with pytest.raises(error, match=name):
        getattr(fastnotes, entry)(logits, target, **call)
