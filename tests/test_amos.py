"""Amos optimiser (fastnotes.optim.Amos) and Su's schedules against the float64 reference and the
oracles of docs/amos.md, 'Worked examples'."""
import io
import math

import numpy as np
import pytest
import torch
from amos_cases import SPEC_DEFAULTS, as_float64, assert_path_close, wide_run

import fastnotes
from fastnotes.optim import Amos, schedules
from fastnotes.reference.amos import amos_update, reduced_axes

THETA0 = [[0.5, -1.0, 0.25], [2.0, -0.75, 1.5]]
G_BASE = [[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]
SPEC = {"lr": 0.01, "eta": 0.5, "beta": 0.9}  # c = d = 0.25, extra_l2 = 0: the defaults


def spec_gradient(t, dtype=torch.float64):
    return 0.1 * torch.tensor(G_BASE, dtype=dtype) * (1 + 0.5 * t)


def reference_run(theta, grads, slot_shape, **hyper):
    """float64 reference trajectory: theta after each step, and the final (v, b)."""
    theta = theta.double()
    v = torch.zeros(slot_shape, dtype=torch.float64)
    b = torch.zeros(slot_shape, dtype=torch.float64)
    m = torch.zeros_like(theta)
    path = []
    for t, g in enumerate(grads):
        theta, v, b, m = amos_update(theta, g.double(), v, b, t + 1, m=m, **hyper)
        path.append(theta)
    return path, v, b


# (slot rule, reference slot shape, extra hyper, {step: theta}, final v or None, final b or None)
SPEC_CASES = {
    "scalar": ("scalar", (), {}, {
        1: [[0.4986911185, -0.9973822370, 0.2461358556], [2.0050355259, -0.7563819074, 1.5076282889]],
        3: [[0.4955053359, -0.9910106718, 0.2367624344], [2.0171900909, -0.7718326110, 1.5260808484]]},
        {1: 0.0151666667, 3: 0.1036641667}, {1: 1.0e-4, 3: 3.9436007e-4}),
    "reduced-axis-0": ("column", (1, 3), {}, {
        1: [[0.4982600141, -0.9973238713, 0.2468252223], [2.0067599434, -0.7565278216, 1.5062495553]],
        3: [[0.4940292066, -0.9908108239, 0.2391228710], [2.0230946082, -0.7723322309, 1.5213599753]]},
        {1: [[0.0085, 0.0145, 0.0225]], 3: [[0.0580975, 0.0991075, 0.1537875]]}, {}),
    "full": ("full", (2, 3), {}, {
        1: [[0.494975, -0.99495, 0.2449875], [2.0049, -0.7549625, 1.504925]],
        3: [[0.4827811052, -0.9826825345, 0.2328303905], [2.0167260414, -0.7669724681, 1.5168246121]]}, {}, {}),
    "clip-momentum": ("scalar", (), {"clip_value": 0.5, "momentum": 0.9}, {
        1: [[0.4998605694, -0.9997211387, 0.2495879581], [2.0005377226, -0.7506809032, 1.5006771532]],
        3: [[0.4990130455, -0.9980260910, 0.2471971275], [2.0032262374, -0.7536349575, 1.5036123729]]},
        {}, {3: 3.29270818e-4}),
}


@pytest.mark.parametrize("case", SPEC_CASES)
def test_reference_matches_spec_oracles(case):
    _, slot_shape, extra, thetas, vs, bs = SPEC_CASES[case]
    theta = torch.tensor(THETA0, dtype=torch.float64)
    v = torch.zeros(slot_shape, dtype=torch.float64)
    b = torch.zeros(slot_shape, dtype=torch.float64)
    m = torch.zeros_like(theta)
    for t in range(3):
        theta, v, b, m = amos_update(theta, spec_gradient(t), v, b, t + 1, m=m, **SPEC, **extra)
        step = t + 1
        if step in thetas:
            torch.testing.assert_close(theta, torch.tensor(thetas[step], dtype=torch.float64), rtol=0, atol=2e-10)
        if step in vs:
            torch.testing.assert_close(v, torch.tensor(vs[step], dtype=torch.float64), rtol=0, atol=5e-11)
        if step in bs:
            torch.testing.assert_close(b, torch.tensor(bs[step], dtype=torch.float64).expand_as(b),
                                       rtol=1e-8, atol=0)


def test_analytic_first_step():
    # scalar slot, b0 = 0: r = 1/mean(g^2), gamma = lr^2, delta = 1
    theta = torch.tensor(THETA0, dtype=torch.float64)
    g = spec_gradient(0)
    new, _, b, _ = amos_update(theta, g, torch.zeros(()), torch.zeros(()), 1, **SPEC)
    expected = theta - 0.01 * 0.5 * g / g.pow(2).mean().sqrt() - 0.5e-4 * theta
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-15)
    assert abs(new[0, 0].item() - 0.49869112) < 5e-9
    assert abs(b.item() - 1e-4) < 1e-18


@pytest.mark.parametrize("case", SPEC_CASES)
def test_optimizer_matches_spec_oracles(backend, case):
    rule, _, extra, thetas, vs, bs = SPEC_CASES[case]
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 2e-7 if dtype == torch.float32 else 2e-10
    p = torch.nn.Parameter(torch.tensor(THETA0, dtype=dtype))
    opt = Amos([p], slot=rule, **SPEC, **extra)
    for t in range(3):
        p.grad = spec_gradient(t, dtype)
        opt.step()
        step = t + 1
        if step in thetas:
            torch.testing.assert_close(p.detach().double(), torch.tensor(thetas[step], dtype=torch.float64),
                                       rtol=0, atol=tol)
        if step in vs:
            torch.testing.assert_close(opt.state[p]["v"].double(), torch.tensor(vs[step], dtype=torch.float64),
                                       rtol=1e-6 if dtype == torch.float32 else 0, atol=5e-11)
        if step in bs:
            b = opt.state[p]["b"].double()
            torch.testing.assert_close(b, torch.tensor(bs[step], dtype=torch.float64).expand_as(b),
                                       rtol=1e-5 if dtype == torch.float32 else 1e-8, atol=0)
    assert opt.state[p]["step"].item() == 3


def _trajectory_cases():
    return [("row", (37, 53), {}), ("column", (29, 70), {"momentum": 0.9}), ("scalar", (301,), {"clip_value": 0.05}),
            ("full", (7, 9), {"momentum": 0.5, "extra_l2": 1e-3}), ("row", (6, 3, 5, 5), {}),
            ("column", (3, 4, 33), {"clip_value": 0.1}), ("row", (4, 1), {})]


@pytest.mark.parametrize("rule, shape, extra", _trajectory_cases(), ids=lambda x: str(x))
def test_trajectory_matches_float64_reference(backend, rng, rule, shape, extra):
    """25 steps (6 under the Triton interpreter) of fp32 (and fp64) Amos vs the float64 reference,
    by the package rule: error <= 2x the fp32 reference's error + a floor. The floor grows with the
    steps taken (one float32 roundoff of the parameter's size per step, at least 2e-7): the slot sums
    run in another order than the reference's, and their rounding accumulates along the path."""
    n_steps = 6 if backend == "triton" else 25
    hyper = dict(lr=0.02, eta=0.3, beta=0.95, **extra)
    theta0 = torch.randn(shape, generator=rng, dtype=torch.float64) * 0.3
    grads = [torch.randn(shape, generator=rng, dtype=torch.float64) * 0.1 * (1 + t % 3) for t in range(n_steps)]
    p32 = torch.nn.Parameter(theta0.float())
    opt = Amos([p32], slot=rule, **hyper)
    slot_shape = tuple(opt.state[p32]["v"].shape)
    path, v, b = reference_run(theta0, grads, slot_shape, **hyper)
    fp32_path, _, _ = _fp32_reference_run(theta0, grads, slot_shape, **hyper)
    for t, g in enumerate(grads):
        p32.grad = g.float()
        opt.step()
        err = (p32.detach().double() - path[t]).abs().max().item()
        composite_err = (fp32_path[t] - path[t]).abs().max().item()
        floor = max(2e-7, torch.finfo(torch.float32).eps * (t + 1) * max(1.0, path[t].abs().max().item()))
        assert err <= 2 * composite_err + floor, f"step {t + 1}: error {err:.3g}, fp32 reference {composite_err:.3g}"
    torch.testing.assert_close(opt.state[p32]["v"].double(), v, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(opt.state[p32]["b"].double(), b, rtol=1e-4, atol=1e-12)
    if backend != "triton":  # the float64 path is exact to rounding
        p64 = torch.nn.Parameter(theta0.clone())
        opt64 = Amos([p64], slot=rule, **hyper)
        for g in grads:
            p64.grad = g.clone()
            opt64.step()
        torch.testing.assert_close(p64.detach(), path[-1], rtol=0, atol=1e-12)


def _fp32_reference_run(theta0, grads, slot_shape, **hyper):
    theta = theta0.float()
    v = torch.zeros(slot_shape)
    b = torch.zeros(slot_shape)
    m = torch.zeros_like(theta)
    path = []
    for t, g in enumerate(grads):
        theta, v, b, m = amos_update(theta, g.float(), v, b, t + 1, m=m, **hyper)
        path.append(theta.double())
    return path, v, b


def test_constant_gradient_schedule_matches_spec():
    """Under a constant gradient v_hat = g^2 exactly, so gamma = lr^2 c_t: b after 1000 steps
    (spec table: 0.0253119, delta 0.99991501) through the optimiser, in float64."""
    lr, eta = 0.005, math.sqrt(1 / 768)
    p = torch.nn.Parameter(torch.full((4, 3), 0.02, dtype=torch.float64))
    opt = Amos([p], lr=lr, eta=eta, beta=0.999, slot="scalar")
    g = torch.full((4, 3), 0.3, dtype=torch.float64)
    for _ in range(1000):
        p.grad = g
        opt.step()
    b = opt.state[p]["b"].item()
    assert abs(b - 0.0253119) < 5e-7
    assert abs(1 / (1 + 0.25 * math.sqrt(lr * eta) * b) - 0.99991501) < 1e-8


def test_zero_gradient_changes_nothing_and_stays_finite(backend):
    dtype = torch.float32
    p = torch.nn.Parameter(torch.randn(8, 5))
    before = p.detach().clone()
    opt = Amos([p], lr=0.01)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    # gamma = 0 and b = 0, so the decay is 0 as well as the gradient term
    assert torch.equal(p.detach(), before)
    assert torch.isfinite(opt.state[p]["v"]).all() and (opt.state[p]["b"] == 0).all()
    assert opt.state[p]["v"].dtype == dtype


def test_size_one_axis_is_not_reduced():
    assert reduced_axes((4, 1), (4, 1)) == ()
    assert reduced_axes((4, 1, 6), (4, 1, 1)) == (2,)
    assert reduced_axes((4, 6), ()) == (0, 1)


def test_non_contiguous_parameter(backend, rng):
    base = torch.randn(9, 12, generator=rng, dtype=torch.float32)
    p = torch.nn.Parameter(base.t())  # [12, 9], not contiguous
    assert not p.is_contiguous()
    theta0 = p.detach().double().clone()
    opt = Amos([p], lr=0.01, eta=0.2)
    g = torch.randn(12, 9, generator=rng)
    p.grad = g
    opt.step()
    expected, _, _, _ = amos_update(theta0, g.double(), torch.zeros(12, 1, dtype=torch.float64),
                                    torch.zeros(12, 1, dtype=torch.float64), 1, lr=0.01, eta=0.2)
    torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


def test_param_groups_use_their_own_hyperparameters(backend, rng):
    w = torch.nn.Parameter(torch.randn(10, 6, generator=rng))
    bias = torch.nn.Parameter(torch.zeros(10))
    opt = Amos([{"params": [w], "slot": "column", "momentum": 0.8}, {"params": [bias], "lr": 0.05, "eta": 0.5}],
               lr=0.01, beta=0.9)
    assert opt.state[w]["eta"] == pytest.approx(w.detach().double().pow(2).mean().sqrt().item())
    assert opt.state[bias]["eta"] == 0.5
    grads = [(torch.randn(10, 6, generator=rng), torch.randn(10, generator=rng)) for _ in range(4)]
    w_path, _, _ = reference_run(w.detach(), [g for g, _ in grads], (1, 6), lr=0.01, eta=opt.state[w]["eta"],
                                 beta=0.9, momentum=0.8)
    b_path, _, _ = reference_run(bias.detach(), [g for _, g in grads], (), lr=0.05, eta=0.5, beta=0.9)
    for gw, gb in grads:
        w.grad, bias.grad = gw, gb
        opt.step()
    torch.testing.assert_close(w.detach().double(), w_path[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.detach().double(), b_path[-1], rtol=0, atol=1e-6)
    assert opt.state[w]["v"].shape == (1, 6) and "m" in opt.state[w] and "m" not in opt.state[bias]


def test_one_group_of_mixed_tensors(backend, rng):
    """One multi-tensor step over a group mixing row, column, scalar and full slots and shapes."""
    shapes = [(9, 16), (5, 3, 4), (33,), (4, 70), (6, 1)]
    rules = {(4, 70): lambda p: (1, 70), (6, 1): lambda p: (6, 1)}
    params = [torch.nn.Parameter(torch.randn(s, generator=rng) * 0.3) for s in shapes]
    theta0 = [p.detach().double().clone() for p in params]

    def slot(p):
        rule = rules.get(tuple(p.shape))
        return rule(p) if rule else ((p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() > 1 else ())

    opt = Amos(params, lr=0.03, eta=0.2, beta=0.9, momentum=0.5, slot=slot)
    grads = [[torch.randn(s, generator=rng) * 0.1 for s in shapes] for _ in range(3)]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    for i, p in enumerate(params):
        path, _, _ = reference_run(theta0[i], [g[i] for g in grads], tuple(opt.state[p]["v"].shape), lr=0.03, eta=0.2,
                                   beta=0.9, momentum=0.5)
        torch.testing.assert_close(p.detach().double(), path[-1], rtol=0, atol=1e-6)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 7, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip(rng):
    model = _model(0)
    opt = Amos(model.parameters(), lr=0.01, momentum=0.9, clip_value=1.0)
    _train(model, opt, 5, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, 5, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer)
    clone = _model(123)  # different init: eta must come from the checkpoint, not the new tensors
    clone.load_state_dict(saved["model"])
    opt2 = Amos(clone.parameters(), lr=0.01, momentum=0.9, clip_value=1.0)
    opt2.load_state_dict(saved["opt"])
    _train(clone, opt2, 5, seed=2)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), clone.parameters()):
        for key in ("step", "v", "b", "m"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])
        assert opt.state[a]["eta"] == opt2.state[b]["eta"]


def test_state_stays_float32_for_half_parameters():
    p = torch.nn.Parameter(torch.randn(4, 6).to(torch.bfloat16))
    opt = Amos([p], lr=0.01, momentum=0.9)
    p.grad = torch.randn(4, 6).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="reference"):
        opt.step()
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert all(opt.state[p][k].dtype == torch.float32 for k in ("v", "b", "m"))
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()


def test_grad_scaler_skips_non_finite_steps(backend):
    model = _model(0)
    opt = Amos(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 7)
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(opt.state[p]["step"].item() == 0 for p in model.parameters())
    assert scaler.get_scale() == 512.0
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    grads = [p.grad.detach().clone() / scaler.get_scale() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    # the step saw the unscaled gradients: compare one tensor with the reference
    w = next(model.parameters())
    expected, _, _, _ = amos_update(before[0].double(), grads[0].double(), torch.zeros(16, 1, dtype=torch.float64),
                                    torch.zeros(16, 1, dtype=torch.float64), 1, lr=0.01, eta=opt.state[w]["eta"])
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-6)


def test_factored_state_memory_is_rows_plus_cols():
    rows, cols = 4096, 4096
    p = torch.nn.Parameter(torch.empty(rows, cols).normal_(0, 0.02))
    state_bytes = {}
    for rule in ("row", "column", "scalar", "full"):
        opt = Amos([p], lr=1e-3, slot=rule)
        state_bytes[rule] = sum(v.numel() * v.element_size() for v in opt.state[p].values()
                                if isinstance(v, torch.Tensor))
    assert state_bytes["row"] <= 2 * 4 * (rows + cols) + 16
    assert state_bytes["column"] <= 2 * 4 * (rows + cols) + 16
    assert state_bytes["scalar"] <= 16
    assert state_bytes["full"] >= 2 * 4 * rows * cols  # the unfactored slot, for contrast


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": "0.1"}, "lr"),
    ({"lr": 0.1, "beta": 1.0}, "beta"), ({"lr": 0.1, "beta": -0.1}, "beta"), ({"lr": 0.1, "momentum": 1.0}, "momentum"),
    ({"lr": 0.1, "clip_value": 0.0}, "clip_value"), ({"lr": 0.1, "eta": -1.0}, "eta"), ({"lr": 0.1, "eta": 0.0}, "eta"),
    ({"lr": 0.1, "extra_l2": -1e-3}, "extra_l2"), ({"lr": 0.1, "c_coef": -1}, "c_coef"), ({"lr": 0.1, "d_coef": float("inf")}, "d_coef"),
    ({"lr": 0.1, "epsilon": 0.0}, "epsilon"), ({"lr": 0.1, "epsilon": 1e-40}, "epsilon"), ({"lr": 0.1, "slot": "diagonal"}, "slot"),
    ({"lr": 0.1, "slot": lambda p: (2, 3)}, "slot"), ({"lr": 0.1, "eta": lambda p: float("nan")}, "eta"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    p = torch.nn.Parameter(torch.randn(4, 5))
    with pytest.raises(ValueError, match=match):
        Amos([p], **kwargs)


def test_bad_parameters_and_gradients_raise():
    with pytest.raises(TypeError, match="floating"):
        Amos([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        Amos([{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -1.0}], lr=0.1)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Amos(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def _converge(start, target, grad_fn, steps=10000, **hyper):
    p = torch.nn.Parameter(torch.tensor(start))
    opt = Amos([p], eta=1.0, slot="scalar", **hyper)
    for _ in range(steps):
        p.grad = grad_fn(p.detach())
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor(target), rtol=0, atol=1e-4)


def test_parabola_converges():
    """amos_test.py: sum((x - x*)^2) from [-1, 10, 1], lr 1, eta 1, scalar slot, 10000 steps."""
    target = torch.tensor([1.0, -1.0, 1.0])
    _converge([-1.0, 10.0, 1.0], [1.0, -1.0, 1.0], lambda x: 2 * (x - target), lr=1.0)


def test_rosenbrock_converges():
    """amos_test.py: Rosenbrock (a=1, b=100) from the origin, lr 0.5, beta 0.5, clip 1,
    momentum 0.9, scalar slot, 10000 steps, to the optimum (1, 1)."""
    def grad(p):
        x, y = p
        return torch.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])

    _converge([0.0, 0.0], [1.0, 1.0], grad, lr=0.5, beta=0.5, clip_value=1.0, momentum=0.9)


# ---- Su's schedules (docs/amos.md, 'Worked examples') --------------------------------------------

def test_su_schedule_oracles():
    a0p = schedules.quadratic_rate(1e4)
    assert a0p == pytest.approx(4.14213562e-5, rel=1e-8)
    a0p0 = schedules.inverse_time_rate(1e4)
    rho0 = schedules.weight_decay_rate(1e-3)
    assert rho0 == pytest.approx(5e-7, rel=1e-12)
    for t, quadratic, rho, inverse in [(0, 1.0, 5e-7, 1.0), (1e3, 0.92203422, 4.6102e-7, 0.90909091),
                                       (1e4, 0.5, 2.5e-7, 0.5), (1e5, 0.03781925, 1.8910e-8, 0.09090909)]:
        assert schedules.decay_quadratic(t, a0p) == pytest.approx(quadratic, rel=1e-7)
        assert rho0 * schedules.decay_quadratic(t, a0p) == pytest.approx(rho, rel=1e-4)
        assert schedules.decay_inverse_time(t, a0p0) == pytest.approx(inverse, rel=1e-7)
    assert schedules.half_life_lambda(1e4)(1e4) == pytest.approx(0.5)
    assert schedules.half_life_lambda(1e4, "quadratic")(1e4) == pytest.approx(0.5)


def test_su_closed_forms_match_their_recursions():
    s, alpha0_p = 0.0, 4.14213562e-5
    for t in range(1, 10001):
        s += alpha0_p * math.exp(-s)
    assert math.exp(-2 * s) == pytest.approx(0.49999492, rel=2e-7)  # closed form 0.5
    # dynamic p: p_t = p0 e^{-S_t}, alpha0 p0 = 1e-4 -> inverse-time decay 1/(2 alpha0 p0 t + 1)
    s = 0.0
    for t in range(1, 10001):
        s += 1e-4 * math.exp(-2 * s)
    assert math.exp(-2 * s) == pytest.approx(0.33332113, rel=2e-6)
    assert schedules.decay_inverse_time(1e4, 1e-4) == pytest.approx(0.33333333, rel=2e-8)


def test_su_step_and_scales():
    theta = torch.tensor([3.0, 4.0])
    schedules.su_step([theta], [torch.tensor([0.6, 0.8])], alpha0=0.1, sigma=0.5)
    torch.testing.assert_close(theta, torch.tensor([2.94257359, 3.92343146]), rtol=0, atol=1e-6)
    assert schedules.eps0_norm(768 * 3072, math.sqrt(1 / 768)) == pytest.approx(55.4256, abs=1e-4)
    assert schedules.eps0_norm(768, 0.5) == pytest.approx(13.8564, abs=1e-4)
    assert schedules.lr_from_init_scale(1e-3, 0.5, numel=768) == pytest.approx(13.8564e-3, abs=1e-7)
    assert schedules.lr_from_init_scale(1e-3, 0.02) == pytest.approx(2e-5)
    zero = torch.tensor([1.0, 2.0])
    schedules.su_step([zero], [torch.zeros(2)], alpha0=0.1, sigma=0.5)
    torch.testing.assert_close(zero, torch.tensor([1.0, 2.0]) * (1 - 0.005))


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="half_life"):
        schedules.quadratic_rate(0)
    with pytest.raises(ValueError, match="t must"):
        schedules.decay_inverse_time(-1, 0.1)
    with pytest.raises(ValueError, match="kind"):
        schedules.half_life_lambda(10, "cosine")
    with pytest.raises(ValueError, match="sigma"):
        schedules.eps0_norm(10, -1.0)
    with pytest.raises(ValueError, match="directions"):
        schedules.su_step([torch.zeros(2)], [], alpha0=0.1, sigma=0.5)


def test_lambda_lr_drives_amos():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = Amos([p], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules.half_life_lambda(10))
    for _ in range(10):
        p.grad = torch.randn(3, 4)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


# ---- training comparison ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_trains_at_least_as_well_as_adamw_defaults(seed):
    """An MLP on a synthetic regression task (a random teacher network plus noise): Amos with the
    BERT recipe's momentum 0.9, lr = 1/sqrt(steps) and beta 0.98 ends at a full-data loss no worse
    than AdamW at its defaults, from the same init and batches."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x_all = torch.randn(4096, 16, generator=gen)
    with torch.no_grad():
        y_all = teacher(x_all) + 0.01 * torch.randn(4096, 1, generator=gen)
    steps, batch = 300, 256

    def run(make_opt):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        opt = make_opt(model.parameters())
        order = torch.Generator().manual_seed(100 + seed)
        for _ in range(steps):
            idx = torch.randint(0, 4096, (batch,), generator=order)
            loss = torch.nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_all), y_all).item()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: waking a thread pool on a shared machine costs more than they do
    try:
        adamw = run(lambda ps: torch.optim.AdamW(ps))
        amos = run(lambda ps: Amos(ps, lr=1 / math.sqrt(steps), beta=0.98, momentum=0.9))
    finally:
        torch.set_num_threads(threads)
    assert amos <= adamw, f"Amos final loss {amos:.4g} > AdamW {adamw:.4g}"


# ---- an independent oracle: the spec's section 3 transcribed in numpy long double --------------------
# Long double (x86-64: 80-bit, aarch64 Linux: quad) holds the squares of 1e200 where float64 overflows,
# so it needs none of the guards the package's code has: it checks them, and the reference itself.

WIDE_RANGE = np.finfo(np.longdouble).maxexp > 2048


def slot_shape_of(rule, shape):
    p = torch.nn.Parameter(torch.zeros(shape))
    return tuple(Amos([p], lr=0.1, slot=rule).state[p]["v"].shape)


def seeded_state(rng, shape, slot_shape, small_scale=0.02, small_v=2e-4):
    """A mid-run state (v, b, m, count) and per-slot gradient scales: b of order 1-10 so that c_coef and
    d_coef matter, and one slot with gradients scaled by small_scale and v = small_v (to put it below
    or near epsilon)."""
    v = torch.rand(slot_shape, generator=rng, dtype=torch.float64) * 0.05 + 0.01
    b = torch.rand(slot_shape, generator=rng, dtype=torch.float64) * 9 + 1
    m = torch.randn(shape, generator=rng, dtype=torch.float64) * 0.01
    scales = torch.ones(slot_shape, dtype=torch.float64)
    scales.view(-1)[0] = small_scale
    v.view(-1)[0] = small_v
    return (v, b, m, 6), scales


def seed_optimizer_state(opt, p, state):
    v, b, m, count = state
    s = opt.state[p]
    s["v"].copy_(v)
    s["b"].copy_(b)
    s["step"].fill_(count)
    if "m" in s:
        s["m"].copy_(m)


def run_amos(theta0, grads, rule, dtype=torch.float32, state=None, **hyper):
    """Amos on one parameter (the active backend): thetas along the path, and the final state."""
    p = torch.nn.Parameter(theta0.to(dtype).clone())
    opt = Amos([p], slot=rule, **hyper)
    if state is not None:
        seed_optimizer_state(opt, p, state)
    path = []
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
        path.append(p.detach().clone())
    return path, opt.state[p]


DISTINCT = {"lr": 0.3, "eta": 0.7, "beta": 0.8, "c_coef": 0.6, "d_coef": 0.05, "momentum": 0.7,
            "clip_value": 0.8, "extra_l2": 0.02, "epsilon": 1e-3}
# a second group's settings, each different from DISTINCT's and from the defaults
DISTINCT_2 = {"lr": 0.15, "eta": 0.4, "beta": 0.6, "c_coef": 0.1, "d_coef": 0.9, "momentum": None,
              "clip_value": None, "extra_l2": 0.05, "epsilon": 1e-6}
RULE_CASES = [("row", (5, 7)), ("column", (6, 9)), ("scalar", (11,)), ("full", (3, 4)),
              (lambda p: (p.shape[0], 1, p.shape[2]), (3, 4, 5))]
RULE_IDS = ["row", "column", "scalar", "full", "callable"]


@pytest.mark.parametrize("rule, shape", RULE_CASES, ids=RULE_IDS)
def test_reference_matches_wide_oracle_with_distinct_hyperparameters(rng, rule, shape):
    """The float64 reference against the long double transcription, from a mid-run state with every
    hyper-parameter distinct and away from its default, and with the reference's own defaults."""
    theta0 = torch.randn(shape, generator=rng, dtype=torch.float64)
    slot_shape = slot_shape_of(rule, shape)
    state, scales = seeded_state(rng, shape, slot_shape)
    grads = [torch.randn(shape, generator=rng, dtype=torch.float64) * 0.5 * scales for _ in range(3)]
    for hyper, given in ((DISTINCT, DISTINCT), (dict(SPEC_DEFAULTS, lr=0.3, eta=0.7), {"lr": 0.3, "eta": 0.7})):
        exact, v_exact, b_exact = wide_run(theta0, grads, slot_shape, state=state, **hyper)
        v, b, m = state[0], state[1], state[2]
        theta = theta0
        for i, g in enumerate(grads):
            theta, v, b, m = amos_update(theta, g, v, b, state[3] + i + 1, m=m, **given)
            torch.testing.assert_close(theta, exact[i], rtol=0, atol=1e-13)
        torch.testing.assert_close(v, as_float64(v_exact), rtol=1e-13, atol=0)
        torch.testing.assert_close(b, as_float64(b_exact), rtol=1e-13, atol=0)


@pytest.mark.parametrize("rule, shape", RULE_CASES, ids=RULE_IDS)
def test_distinct_hyperparameters_and_defaults_in_three_groups_from_mid_run_state(backend, rng, rule, shape):
    """Three parameter groups: two with every hyper-parameter distinct (from each other and from the
    defaults), one on Amos's defaults checked against the spec's values; each tensor starts from a
    seeded mid-run state (count 6, b of order 1-10 so that c_coef and d_coef change the step by tens
    of percent, one slot whose v is below epsilon, or for the defaults between 2^-125 and 1e-8). A
    swap of two coefficients, a wrong default or one group's settings used for another shows."""
    dtype = torch.float32
    thetas = [torch.randn(shape, generator=rng, dtype=torch.float64) for _ in range(3)]
    params = [torch.nn.Parameter(t.to(dtype)) for t in thetas]
    opt = Amos([{"params": [params[0]], **DISTINCT}, {"params": [params[1]], **DISTINCT_2}, {"params": [params[2]]}],
               lr=0.05, slot=rule)
    defaults = dict(SPEC_DEFAULTS, lr=0.05, eta=opt.state[params[2]]["eta"])
    assert defaults["eta"] == pytest.approx(thetas[2].pow(2).mean().sqrt().item() if len(shape) > 1 else 0.5, rel=1e-6)
    slot_shape = tuple(opt.state[params[0]]["v"].shape)
    n_steps = 2
    setups = []
    for p, hyper in zip(params, (DISTINCT, DISTINCT_2, defaults)):
        small = (1e-7, 1e-12) if hyper is defaults else (0.02, 2e-4)
        state, scales = seeded_state(rng, shape, slot_shape, *small)
        seed_optimizer_state(opt, p, state)
        grads = [torch.randn(shape, generator=rng, dtype=torch.float64) * 0.5 * scales for _ in range(n_steps)]
        setups.append((state, grads, hyper))
    paths = [[], [], []]
    for t in range(n_steps):
        for p, (_, grads, _) in zip(params, setups):
            p.grad = grads[t].to(dtype)
        opt.step()
        for path, p in zip(paths, params):
            path.append(p.detach().clone())
    for i, (state, grads, hyper) in enumerate(setups):
        exact, v_exact, b_exact = wide_run(thetas[i], grads, slot_shape, state=state, **hyper)
        composite, _ = _reference_path(thetas[i], grads, slot_shape, dtype, state, hyper)
        assert_path_close(paths[i], exact, composite, f"group {i}")
        torch.testing.assert_close(opt.state[params[i]]["v"].double(), as_float64(v_exact), rtol=1e-5, atol=0)
        torch.testing.assert_close(opt.state[params[i]]["b"].double(), as_float64(b_exact), rtol=1e-5, atol=0)


def _reference_path(theta0, grads, slot_shape, dtype, state=None, hyper=None):
    """The plain-torch reference run in `dtype` (the same-dtype composite of the package rule)."""
    hyper = dict(SPEC_DEFAULTS, **hyper)
    if state is None:
        state = (torch.zeros(slot_shape), torch.zeros(slot_shape), torch.zeros(theta0.shape), 0)
    v, b, m = (s.to(dtype) for s in state[:3])
    theta = theta0.to(dtype)
    path = []
    for i, g in enumerate(grads):
        theta, v, b, m = amos_update(theta, g.to(dtype), v, b, state[3] + i + 1, m=m, **hyper)
        path.append(theta)
    return path, v


@pytest.mark.parametrize("big", [1e20, 1e30])
@pytest.mark.parametrize("rule, shape", RULE_CASES, ids=RULE_IDS)
def test_one_huge_gradient_does_not_poison_float32(backend, rng, rule, shape, big):
    """Issue 18 (6): one finite gradient entry whose square overflows float32 (above ~1.8e19). The
    step and the ones after it stay finite and follow the exact (long double) trajectory; v holds
    the exact value, saturated at the largest float32 where that overflows (it decays from there)."""
    hyper = {"lr": 0.05, "eta": 0.3, "beta": 0.9, "momentum": 0.5}
    theta0 = torch.randn(shape, generator=rng, dtype=torch.float64)
    grads = [torch.randn(shape, generator=rng, dtype=torch.float64) * 0.1 for _ in range(3)]
    grads[1].view(-1)[0] = big
    path, state = run_amos(theta0, grads, rule, **hyper)
    slot_shape = tuple(state["v"].shape)
    full = dict(SPEC_DEFAULTS, **hyper)
    exact, v_exact, b_exact = wide_run(theta0, grads, slot_shape, v_max=torch.finfo(torch.float32).max, **full)
    composite, _ = _reference_path(theta0, grads, slot_shape, torch.float32, hyper=hyper)
    assert_path_close(path, exact, composite, f"|g| = {big:g}")
    assert torch.isfinite(state["v"]).all() and torch.isfinite(state["m"]).all()
    torch.testing.assert_close(state["v"].double(), as_float64(v_exact, torch.float32), rtol=1e-5, atol=0)
    torch.testing.assert_close(state["b"].double(), as_float64(b_exact), rtol=1e-5, atol=0)


@pytest.mark.skipif(not WIDE_RANGE, reason="numpy long double has no wider exponent range than float64 here")
@pytest.mark.parametrize("big", [1e200, 1e300])
@pytest.mark.parametrize("rule, shape", RULE_CASES, ids=RULE_IDS)
@pytest.mark.parametrize("backend_name", ["numba", "reference"])
def test_one_huge_gradient_does_not_poison_float64(backend_name, rng, rule, shape, big):
    """The same in float64, whose squares overflow above ~1.3e154: the kernels and the reference
    follow the long double trajectory, v saturated at the largest float64."""
    hyper = {"lr": 0.05, "eta": 0.3, "beta": 0.9, "momentum": 0.5}
    theta0 = torch.randn(shape, generator=rng, dtype=torch.float64)
    grads = [torch.randn(shape, generator=rng, dtype=torch.float64) * 0.1 for _ in range(3)]
    grads[1].view(-1)[-1] = -big
    with fastnotes.use_backend(backend_name):
        path, state = run_amos(theta0, grads, rule, dtype=torch.float64, **hyper)
    slot_shape = tuple(state["v"].shape)
    exact, v_exact, b_exact = wide_run(theta0, grads, slot_shape, v_max=torch.finfo(torch.float64).max,
                                       **dict(SPEC_DEFAULTS, **hyper))
    for t, (got, want) in enumerate(zip(path, exact)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13, msg=lambda m: f"step {t + 1}: {m}")
    torch.testing.assert_close(state["v"], as_float64(v_exact), rtol=1e-13, atol=0)
    torch.testing.assert_close(state["b"], as_float64(b_exact), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape, rule", [((0, 5), "row"), ((5, 0), "row"), ((5, 0), "column"), ((0,), "row"),
                                         ((0, 3, 4), "full"), ((2, 0, 3), "scalar")], ids=str)
def test_empty_parameters_step_as_no_ops(backend, rng, shape, rule):
    """Issue 18 (11): an empty tensor (alone, or in a group with others) constructs, steps as a
    no-op and keeps a finite state; its neighbour steps as it would alone."""
    empty = torch.nn.Parameter(torch.empty(shape))
    other = torch.nn.Parameter(torch.randn(4, 6, generator=rng))
    theta0 = other.detach().double().clone()
    opt = Amos([empty, other], lr=0.05, slot=rule, momentum=0.9)
    assert math.isfinite(opt.state[empty]["eta"]) and opt.state[empty]["eta"] > 0
    grads = [torch.randn(4, 6, generator=rng, dtype=torch.float64) for _ in range(2)]
    for g in grads:
        empty.grad = torch.empty(shape)
        other.grad = g.float()
        opt.step()
    assert empty.shape == shape
    for key in ("v", "b", "m"):
        assert torch.isfinite(opt.state[empty][key]).all() and (opt.state[empty][key] == 0).all()
    eta = opt.state[other]["eta"]
    exact, _, _ = wide_run(theta0, grads, tuple(opt.state[other]["v"].shape),
                           **dict(SPEC_DEFAULTS, lr=0.05, eta=eta, momentum=0.9))
    torch.testing.assert_close(other.detach().double(), exact[-1], rtol=0, atol=1e-6)
    alone = torch.nn.Parameter(torch.empty(shape))
    Amos([alone], lr=0.1)  # no neighbour to take the default eta from either


@pytest.mark.parametrize("shape, rule", [((300, 300), "row"), ((300, 300), "column"), ((300, 300), "scalar"),
                                         ((300, 300), "full"), ((2, 70000), "row")], ids=str)
def test_numba_parallel_and_split_paths(rng, shape, rule):
    """The numba kernels' paths for tensors of 2^16 entries or more (threads; a few long rows split in
    chunks of 65536 and reduced across them), with a gradient entry that overflows float32 in a later
    chunk, against the long double oracle."""
    hyper = {"lr": 0.05, "eta": 0.3, "beta": 0.9, "clip_value": 1e25}
    theta0 = torch.randn(shape, generator=rng, dtype=torch.float64)
    grads = [torch.randn(shape, generator=rng, dtype=torch.float64) * 0.1 for _ in range(2)]
    grads[0][-1, -3] = 1e24
    grads[1][0, -1] = -1e30  # clipped to 1e25
    with fastnotes.use_backend("numba"):
        path, state = run_amos(theta0, grads, rule, **hyper)
    slot_shape = tuple(state["v"].shape)
    exact, v_exact, _ = wide_run(theta0, grads, slot_shape, v_max=torch.finfo(torch.float32).max,
                                 **dict(SPEC_DEFAULTS, **hyper))
    composite, _ = _reference_path(theta0, grads, slot_shape, torch.float32, hyper=hyper)
    assert_path_close(path, exact, composite, rule)
    torch.testing.assert_close(state["v"].double(), as_float64(v_exact, torch.float32), rtol=1e-4, atol=0)


def test_long_reductions_and_tails_in_one_group(backend, rng):
    """One multi-tensor group whose slots reduce over more entries than one tile (Triton: a scalar
    slot over 2100 entries in 1024-row tiles, a column slot over 70 rows in 32-row tiles), with the
    overflowing gradient in the last, partial tile."""
    shapes = [(2100,), (70, 40), (5, 3)]
    hyper = {"lr": 0.05, "eta": 0.3, "beta": 0.9}
    thetas = [torch.randn(s, generator=rng, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter(t.float()) for t in thetas]
    opt = Amos(params, slot=lambda p: () if p.dim() == 1 else (1, p.shape[1]), **hyper)
    grads = [[torch.randn(s, generator=rng, dtype=torch.float64) * 0.1 for s in shapes] for _ in range(2)]
    grads[0][0][2050] = 3e19
    grads[1][1][65, 33] = -1e30
    paths = [[] for _ in shapes]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.float()
        opt.step()
        for path, p in zip(paths, params):
            path.append(p.detach().clone())
    for i, p in enumerate(params):
        slot_shape = tuple(opt.state[p]["v"].shape)
        own = [g[i] for g in grads]
        exact, v_exact, _ = wide_run(thetas[i], own, slot_shape, v_max=torch.finfo(torch.float32).max,
                                     **dict(SPEC_DEFAULTS, **hyper))
        composite, _ = _reference_path(thetas[i], own, slot_shape, torch.float32, hyper=hyper)
        assert_path_close(paths[i], exact, composite, str(shapes[i]))
        torch.testing.assert_close(opt.state[p]["v"].double(), as_float64(v_exact, torch.float32), rtol=1e-5, atol=0)


def test_state_dict_round_trip_mid_run_every_backend(backend, rng):
    """Save after 2 steps, load into a fresh optimiser over a copy, take 2 more steps on both: the
    same state and parameters (the same backend on the same inputs, so exactly)."""
    shape = (5, 7)
    theta0 = torch.randn(shape, generator=rng)
    grads = [torch.randn(shape, generator=rng) for _ in range(4)]
    p = torch.nn.Parameter(theta0.clone())
    opt = Amos([p], **DISTINCT)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    q = torch.nn.Parameter(p.detach().clone())
    buffer.seek(0)
    opt2 = Amos([q], lr=0.01)  # the hyper-parameters come from the checkpoint
    opt2.load_state_dict(torch.load(buffer))
    assert opt2.param_groups[0]["c_coef"] == DISTINCT["c_coef"]
    for g in grads[2:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)
    for key in ("step", "v", "b", "m"):
        assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_beta_and_momentum_near_one_keep_float32_precision(backend, rng):
    """1 - beta, 1 - momentum and 1 - beta^t cancel in float32 (1 - 0.999f is off by 1.3e-5
    relative): the kernels take them from float64. With beta = 0.999 the steps (of size ~1), and
    with momentum = 0.999 the momentum slot, are as accurate as the float32 reference's (they were
    off by ~6e-6 and ~1e-5 relative)."""
    shape = (6, 5)
    theta0 = torch.randn(shape, generator=rng, dtype=torch.float64).float().double()
    grads = [torch.randn(shape, generator=rng, dtype=torch.float64).float().double() for _ in range(3)]
    hyper = {"lr": 0.5, "eta": 2.0, "beta": 0.999}
    path, _ = run_amos(theta0, grads, "row", **hyper)
    exact, _, _ = wide_run(theta0, grads, (6, 1), **dict(SPEC_DEFAULTS, **hyper))
    composite, _ = _reference_path(theta0, grads, (6, 1), torch.float32, hyper=hyper)
    assert_path_close(path, exact, composite, "beta = 0.999", theta0=theta0)

    hyper = dict(hyper, momentum=0.999)
    _, state = run_amos(theta0, grads, "row", **hyper)
    exact, _, _ = wide_run(theta0, grads, (6, 1), **dict(SPEC_DEFAULTS, **hyper))
    m_exact = exact[-1] - exact[-2]  # the last step is the momentum slot
    theta, v, b, m = theta0.float(), torch.zeros(6, 1), torch.zeros(6, 1), torch.zeros(shape)
    for t, g in enumerate(grads):
        theta, v, b, m = amos_update(theta, g.float(), v, b, t + 1, m=m, **dict(SPEC_DEFAULTS, **hyper))
    err = (state["m"].double() - m_exact).abs().max().item()
    composite_err = (m.double() - m_exact).abs().max().item()
    assert err <= 2 * composite_err + 8 * torch.finfo(torch.float32).eps * m_exact.abs().max().item()
