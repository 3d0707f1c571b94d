"""Property tests of fastnotes.optim.Amos (hypothesis): random shapes (0-d, 1-d, empty, up to 4-d,
strided), dtypes, slot kinds (row, column, scalar, full, a callable over a run of axes), gradient
magnitudes from 1e-30 to 1e30 with spikes up to the dtype's range, every hyper-parameter, mid-run
state, on every backend, against the long double oracle of amos_cases; bad hyper-parameters raise
errors that name them. Tiny shapes and small budgets (the Triton interpreter costs ~3 ms a program)."""
import math

import pytest
import torch
from amos_cases import SPEC_DEFAULTS, as_float64, assert_path_close, wide_run
from conftest import available_backends
from hypothesis import given
from hypothesis import strategies as st
from oracle import property_settings

import fastnotes
from fastnotes.optim import Amos
from fastnotes.reference.amos import amos_update

BACKENDS = available_backends()
SETTINGS = property_settings(30)
SPIKE_EXPONENT = {torch.float32: 38, torch.bfloat16: 38, torch.float64: 307}


def dtypes_for(backend):
    if backend == "triton":
        return [torch.float32]  # the interpreter runs float32 only
    if backend == "numba":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float64, torch.bfloat16]  # bfloat16 runs on the reference


def callable_slot(first, last):
    """Average over the axes first..last-1 (clamped to the tensor's rank): a contiguous run, which
    every kernel takes."""
    def slot(p):
        return tuple(1 if first <= a < last else n for a, n in enumerate(p.shape))
    return slot


@st.composite
def amos_case(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from(dtypes_for(backend)))
    ndim = draw(st.integers(0, 4))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    if shape and draw(st.integers(0, 4)) == 0:  # an empty tensor one time in five
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    shape = tuple(shape)
    if math.prod(shape) > 150:  # keep it small for the interpreter
        shape = shape[:2]
    rule = draw(st.sampled_from(["row", "column", "scalar", "full", "callable"]))
    if rule == "callable":
        first = draw(st.integers(0, 3))
        rule = callable_slot(first, first + draw(st.integers(1, 3)))
    hyper = {
        "lr": draw(st.floats(1e-4, 1.0)), "eta": draw(st.floats(1e-3, 2.0)), "beta": draw(st.floats(0.0, 0.999)),
        "momentum": draw(st.one_of(st.none(), st.floats(0.0, 0.99))),
        "clip_value": draw(st.one_of(st.none(), st.floats(1e-3, 1e3))),
        "extra_l2": draw(st.floats(0.0, 0.1)), "c_coef": draw(st.floats(0.0, 2.0)), "d_coef": draw(st.floats(0.0, 2.0)),
        "epsilon": draw(st.sampled_from([2.0 ** -126, 2.0 ** -125, 1e-30, 1e-8, 1e-3]))}
    exponents = draw(st.lists(st.integers(-30, 30), min_size=1, max_size=3))  # gradient scale per step
    spike = draw(st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(-30, SPIKE_EXPONENT[dtype]))))
    mid_run = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    return dict(backend=backend, dtype=dtype, shape=shape, rule=rule, hyper=hyper, exponents=exponents,
                spike=spike, mid_run=mid_run, layout=layout, seed=draw(st.integers(0, 2 ** 31 - 1)))


def strided(value, layout):
    if layout != "strided" or value.dim() == 0:
        return value.clone()
    wide = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype)
    wide[..., ::2] = value
    return wide[..., ::2]


def composite_path(theta0, grads, state, dtype, hyper):
    """The reference in the parameter's dtype (float32 math and state for bfloat16, rounded to
    bfloat16 after each step as the optimiser stores it): the package rule's same-dtype composite.
    Returns the thetas along the path and the final (v, b)."""
    math_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    v, b, m, count = (s.to(math_dtype) if torch.is_tensor(s) else s for s in state)
    theta = theta0.to(dtype)
    path = []
    for i, g in enumerate(grads):
        new, v, b, m = amos_update(theta.to(math_dtype), g.to(dtype), v, b, count + i + 1, m=m,
                                   **dict(SPEC_DEFAULTS, **hyper))
        theta = new.to(dtype)
        path.append(theta)
    return path, v, b


def assert_slot_close(got, exact, composite, rtol, floor, what):
    """got within 2x the composite's error of the exact value, plus rtol relative, plus a floor."""
    got, composite = got.double(), composite.double()
    bound = 2 * (composite - exact).abs() + rtol * exact.abs() + floor
    assert ((got - exact).abs() <= bound).all(), f"{what}: got {got}, exact {exact}, composite {composite}"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy sums in the Triton interpreter
@SETTINGS
@given(amos_case())
def test_amos_matches_long_double_oracle(case):
    """A few steps of Amos on one tensor follow the long double trajectory by the package rule, with
    v (saturated at the state dtype's largest value) and b to rounding; an empty tensor's steps
    are no-ops with a finite state."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, shape, hyper = case["dtype"], case["shape"], case["hyper"]
    theta0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    p = torch.nn.Parameter(strided(theta0.to(dtype), case["layout"]))
    opt = Amos([p], slot=case["rule"], **hyper)
    state = opt.state[p]
    slot_shape = tuple(state["v"].shape)
    start = (torch.zeros(slot_shape, dtype=torch.float64), torch.zeros(slot_shape, dtype=torch.float64),
             torch.zeros(shape, dtype=torch.float64), 0)
    if case["mid_run"]:  # as after a state_dict load: the count, v and b of an earlier run
        start = (torch.rand(slot_shape, generator=gen, dtype=torch.float64) * 0.1,
                 torch.rand(slot_shape, generator=gen, dtype=torch.float64) * 5,
                 torch.randn(shape, generator=gen, dtype=torch.float64) * 0.01, 4)
        state["v"].copy_(start[0])
        state["b"].copy_(start[1])
        state["step"].fill_(start[3])
        if "m" in state:
            state["m"].copy_(start[2])
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** e for e in case["exponents"]]
    if case["spike"] is not None and math.prod(shape) > 0 and case["spike"][0] < len(grads):
        step, exponent = case["spike"]
        grads[step].view(-1)[-1] = -(10.0 ** exponent)
    grads = [g.to(dtype).double() for g in grads]  # what the parameter's dtype can hold
    path = []
    with fastnotes.use_backend(case["backend"]):
        for g in grads:
            p.grad = strided(g.to(dtype), case["layout"])
            opt.step()
            path.append(p.detach().clone())
    assert state["step"].item() == start[3] + len(grads)
    for key in ("v", "b"):
        assert torch.isfinite(state[key]).all(), f"{key} is not finite"
    if math.prod(shape) == 0:
        assert all(t.shape == shape for t in path)
        assert torch.equal(state["v"].double(), start[0].to(state["v"].dtype).double())
        assert torch.equal(state["b"].double(), start[1].to(state["b"].dtype).double())
        return
    state_dtype = state["v"].dtype
    exact, v_exact, b_exact = wide_run(theta0, grads, slot_shape, state=start, v_max=torch.finfo(state_dtype).max,
                                       **dict(SPEC_DEFAULTS, **hyper))
    composite, v_composite, b_composite = composite_path(theta0, grads, start, dtype, hyper)
    assert_path_close(path, exact, composite, case["backend"], theta0=theta0)
    rtol = 1e-12 if state_dtype == torch.float64 else 2e-5
    # Squares below the normal range (|g| < 1e-19 in float32) round to the subnormal grid: v is off by
    # that much (it is below epsilon then: the step does not use it), and each step's increment of b
    # by lr^2 bias r g^2 (1 + b), with r <= 1 / epsilon, by up to lr^2 (half a grid step / epsilon) (1 + b).
    b_exact = as_float64(b_exact, state_dtype)
    grid = torch.finfo(state_dtype).smallest_normal * torch.finfo(state_dtype).eps
    b_floor = 2 * len(grads) * hyper["lr"] ** 2 * grid / hyper["epsilon"] * (1 + b_exact.abs())
    assert_slot_close(state["v"], as_float64(v_exact, state_dtype), v_composite, rtol, 2 * len(grads) * grid, "v")
    assert_slot_close(state["b"], b_exact, b_composite, rtol, b_floor, "b")


BAD_VALUES = {
    "lr": [0.0, -1e-3, math.nan, math.inf, "0.1", True],
    "beta": [-0.1, 1.0, 1.5, math.nan],
    "momentum": [-0.5, 1.0, math.inf],
    "clip_value": [0.0, -1.0, math.nan],
    "extra_l2": [-1e-6, math.inf],
    "c_coef": [-0.25, math.nan, math.inf],
    "d_coef": [-1.0, math.inf, None],
    "epsilon": [0.0, -1e-8, 1e-40, 2.0 ** -127, math.nan],
    "eta": [0.0, -0.5, math.nan, math.inf, lambda p: -1.0, lambda p: math.nan],
    "slot": ["rows", "", 3, lambda p: (2, 3, 4), lambda p: (7,) * p.dim()],
}


@SETTINGS
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda name: st.tuples(st.just(name), st.sampled_from(BAD_VALUES[name]))),
       st.booleans())
def test_bad_hyperparameters_raise_naming_them(bad, in_group):
    """Every invalid setting raises a ValueError naming the argument, at construction, whether it
    is given to Amos or in a parameter group."""
    name, value = bad
    p = torch.nn.Parameter(torch.randn(4, 5))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=name):
        if in_group:
            Amos([{"params": [p], name: value}], lr=0.01)
        else:
            Amos([p], **{"lr": 0.01, name: value})
    assert torch.equal(p.detach(), before)
