"""exact_loss / expected_accuracy on every backend against the float64 reference, the spec oracles,
an independent Monte Carlo estimate, and the toy problem."""
import importlib.util
import math
import pathlib

import pytest
import torch
from conftest import DEVICE, available_backends

import fastnotes
from fastnotes.exact import gauss_hermite
from fastnotes.reference import exact as reference


def backend_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def oracle(logits, labels, sigma, margin=None, ignore_index=-100, nodes=32):
    """float64 P through the reference with the same quadrature (the spec oracles check the
    quadrature itself); backward it for the gradients of logits and sigma."""
    x = logits.detach().double().clone().requires_grad_()
    sig = torch.as_tensor(sigma, dtype=torch.float64).clone().requires_grad_()
    rows = sig.reshape(-1).expand(x.shape[0])
    labels = torch.where(labels == ignore_index, -1, labels)
    t, w = gauss_hermite(nodes)
    prob = reference.expected_accuracy(x, labels, rows, margin, t, w)
    return prob, x, sig


def run(logits, labels, sigma, margin=None, upstream=None, **kwargs):
    x = logits.detach().clone().to(DEVICE).requires_grad_()
    sig = torch.as_tensor(sigma, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    sig = sig.to(DEVICE).clone().requires_grad_()
    prob = fastnotes.expected_accuracy(x, labels.to(DEVICE), sigma=sig, margin=margin, **kwargs)
    prob.backward(upstream.to(prob) if upstream is not None else torch.ones_like(prob))
    return prob.detach().cpu(), x.grad.cpu(), sig.grad.cpu()


def r_logits(r):
    """Logits whose label 0 beats class i by r_i at sigma = 1."""
    return torch.tensor([[0.0] + [-v for v in r]], dtype=torch.float64)


# ---- spec oracles (docs/exact.md, 'Worked examples') -----------------------------------------------

ORACLES = {
    "X1": ([4.0], 0.9976611325, [0.0051667463]),
    "X2": ([0.0, 0.0], 1 / 3, [0.1410473959] * 2),
    "X3": ([0.0] * 4, 0.2, [0.0581482237] * 4),
    "X4": ([1.0, -0.5], 0.330085097, [0.04550075, 0.22426796]),
    "X5": ([2.0, 0.3, -1.0], 0.1978834422, [0.00290803, 0.04710077, 0.16129396]),
    "X6": ([-6.0, -6.0], 1.16332094e-7, [2.5e-7, 2.5e-7]),
}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_spec_oracles(backend, name):
    r, p_expected, dp_dr_expected = ORACLES[name]
    dtype = backend_dtype(backend)
    prob, grad, _ = run(r_logits(r).to(dtype), torch.tensor([0]), 1.0)
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    assert abs(prob.item() - p_expected) <= tol * 10
    # dP/ds_i = -dP/dr_i for the competitors (sigma = 1)
    got = -grad[0, 1:].double()
    assert torch.allclose(got, torch.tensor(dp_dr_expected, dtype=torch.float64), atol=max(tol, 1e-8) * 10, rtol=1e-6)


FULL_LOGITS = torch.tensor([[1, 2, 0.5, -1], [0.2, -0.3, 0.1, 0]], dtype=torch.float64)
FULL_LABELS = torch.tensor([1, 3])


@pytest.mark.parametrize("margin, loss_expected, dp_dsigma", [
    (None, 0.4306593977, [-0.51135481, 0.08356087]),
    (1.0, 0.4750333409, [-0.82086697, 0.08356087]),
])
def test_spec_full_loss(backend, margin, loss_expected, dp_dsigma):
    dtype = backend_dtype(backend)
    x = FULL_LOGITS.to(dtype).to(DEVICE).clone().requires_grad_()
    loss = fastnotes.exact_loss(x, FULL_LABELS.to(DEVICE), sigma=0.5, margin=margin)
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    assert abs(loss.item() - loss_expected) < tol * 10
    if margin is None:
        loss.backward()
        expected = torch.tensor([[0.0984585, -0.11804036, 0.01957693, 0.00000494],
                                 [0.11245605, 0.03623997, 0.09271, -0.24140602]], dtype=torch.float64)
        assert torch.allclose(x.grad.double().cpu(), expected, atol=1e-7 if dtype == torch.float64 else 2e-6)
    _, _, sig_grad = run(FULL_LOGITS.to(dtype), FULL_LABELS, torch.full((2,), 0.5), margin=margin)
    assert torch.allclose(sig_grad.double(), torch.tensor(dp_dsigma, dtype=torch.float64), atol=1e-7 if dtype == torch.float64 else 2e-6)


def test_two_classes_closed_form(backend, rng):
    dtype = backend_dtype(backend)
    logits = (torch.randn(9, 2, generator=rng, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 2, (9,), generator=rng)
    prob, _, _ = run(logits, labels, 0.7)
    m = (logits.double().gather(1, labels[:, None]) - logits.double().gather(1, 1 - labels[:, None])).squeeze(1)
    expected = 0.5 * torch.erfc(-(m / 0.7) / 2)  # Phi(r / sqrt 2)
    assert torch.allclose(prob.double(), expected, atol=1e-9 if dtype == torch.float64 else 2e-6)


# ---- random inputs against the reference ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (4, 17), (3, 130)], ids=str)
@pytest.mark.parametrize("margin", [None, 0.8])
def test_random_against_reference(backend, shape, margin, rng):
    """float64 where the backend has it, and float32 (the CPU default path) everywhere."""
    for dtype in dict.fromkeys([backend_dtype(backend), torch.float32]):
        logits = (torch.randn(shape, generator=rng, dtype=torch.float64) * 2).to(dtype)
        labels = torch.randint(0, shape[1], (shape[0],), generator=rng)
        labels[1] = -100  # an ignored row
        sigma = (torch.rand(shape[0], generator=rng, dtype=torch.float64) + 0.3).to(dtype)
        upstream = torch.randn(shape[0], generator=rng, dtype=torch.float64)
        prob, grad, sig_grad = run(logits, labels, sigma, margin=margin, upstream=upstream)
        exact, x, sig = oracle(logits, labels, sigma, margin)
        exact.backward(upstream)
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        assert prob[1] == 1 and (grad[1] == 0).all() and sig_grad[1] == 0, "ignored rows take no part"
        assert torch.allclose(prob.double(), exact.detach(), atol=tol)
        assert torch.allclose(grad.double(), x.grad, atol=tol)
        assert torch.allclose(sig_grad.double(), sig.grad, atol=tol * 10)


def test_margin_equality_passes_gradient(backend):
    """A competitor beaten by exactly M still gets the gradient (torch.clamp passes it at equality);
    one beaten by more gets none. Dyadic logits make s_y - s_i == M exact in every dtype."""
    dtype = backend_dtype(backend)
    logits = torch.tensor([[1.0, 0.5, 0.25, 0.75, 1.25], [0.0, -0.5, 0.5, -1.0, -0.5]], dtype=dtype)
    labels = torch.tensor([0, 0])
    prob, grad, sig_grad = run(logits, labels, 0.75, margin=0.5)
    exact, x, sig = oracle(logits, labels, 0.75, margin=0.5)
    exact.sum().backward()
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    assert grad[0, 1] != 0 and grad[1, 1] != 0 and grad[1, 4] != 0 and grad[0, 2] == 0 and grad[1, 3] == 0
    assert torch.allclose(grad.double(), x.grad, atol=tol)
    assert torch.allclose(sig_grad.double(), sig.grad, atol=tol)


@pytest.mark.parametrize("nodes", [7, 16, 64])
def test_nodes(backend, nodes, rng):
    """Other rules than the default K = 32, against the reference with the same nodes (Triton
    compiles K in {16, 32, 64}), and the spec's accuracy vs K on the X5 oracle."""
    if backend == "triton" and nodes == 7:
        with pytest.raises(fastnotes.BackendUnsupportedError, match="nodes"):
            fastnotes.expected_accuracy(torch.zeros(2, 3, device=DEVICE), torch.tensor([0, 1], device=DEVICE),
                                        nodes=7)
        return
    dtype = backend_dtype(backend)
    logits = (torch.randn(4, 70, generator=rng, dtype=torch.float64) * 0.3).to(dtype)
    labels = torch.tensor([0, 69, 33, 64])
    sigma = torch.rand(4, generator=rng, dtype=torch.float64) + 0.2
    upstream = torch.randn(4, generator=rng, dtype=torch.float64)
    prob, grad, sig_grad = run(logits, labels, sigma.to(dtype), margin=0.3, upstream=upstream, nodes=nodes)
    exact, x, sig = oracle(logits, labels, sigma, margin=0.3, nodes=nodes)
    exact.backward(upstream)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert torch.allclose(prob.double(), exact.detach(), atol=tol)
    assert torch.allclose(grad.double(), x.grad, atol=tol)
    assert torch.allclose(sig_grad.double(), sig.grad, atol=tol * 10)
    prob_x5, _, _ = run(r_logits([2.0, 0.3, -1.0]).to(dtype), torch.tensor([0]), 1.0, nodes=nodes)
    quadrature_error = {7: 1e-4, 16: 3e-7, 64: 1e-9}[nodes]
    assert abs(prob_x5.item() - 0.1978834422) < quadrature_error + (tol if dtype != torch.float64 else 0)


def test_many_classes(backend, rng):
    n_rows = 2 if backend == "triton" else 16  # the interpreter runs one program per row
    dtype = backend_dtype(backend)
    logits = (torch.randn(n_rows, 1000, generator=rng, dtype=torch.float64)).to(dtype)
    labels = logits.double().argmax(1)  # likely-correct rows: P well above 0
    prob, grad, _ = run(logits, labels, 0.3)
    exact, x, _ = oracle(logits, labels, 0.3)
    exact.sum().backward()
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    assert torch.allclose(prob.double(), exact.detach(), atol=tol, rtol=1e-5)
    assert torch.allclose(grad.double(), x.grad, atol=tol, rtol=1e-4)


def test_extreme_logits_stay_finite(backend):
    """r out to +-200: naive log Phi is -inf below -14.5 in float32 and gives NaN gradients."""
    dtype = backend_dtype(backend)
    logits = torch.tensor([[0.0, 40.0, -40.0, 3.0], [0.0, -40.0, -40.0, -40.0], [0.0, 20.0, 20.0, 20.0]], dtype=dtype)
    prob, grad, sig_grad = run(logits, torch.tensor([0, 0, 0]), 0.2)
    assert torch.isfinite(prob).all() and torch.isfinite(grad).all() and torch.isfinite(sig_grad).all()
    assert prob[1].item() == pytest.approx(1.0) and prob[0].item() < 1e-30


def test_monte_carlo_agrees(rng):
    """The quadrature against sampling argmax(logits + sigma * eps) directly."""
    logits = torch.tensor([[0.5, 0.0, -0.3, 0.4, -1.0]], dtype=torch.float64)
    sigma = 0.6
    prob = fastnotes.expected_accuracy(logits, torch.tensor([0]), sigma=sigma).item()
    n = 400_000
    noisy = logits + sigma * torch.randn(n, 5, generator=rng, dtype=torch.float64)
    estimate = (noisy.argmax(1) == 0).double().mean().item()
    std = math.sqrt(prob * (1 - prob) / n)
    assert abs(estimate - prob) < 5 * std


@pytest.mark.parametrize("backend_name", [b for b in ("numba", "reference") if b in available_backends("cpu")])
def test_gradcheck(backend_name, rng):
    logits = torch.randn(3, 6, generator=rng, dtype=torch.float64).requires_grad_()
    sigma = (torch.rand(3, generator=rng, dtype=torch.float64) + 0.5).requires_grad_()
    labels = torch.tensor([0, 5, 2])
    with fastnotes.use_backend(backend_name):
        assert torch.autograd.gradcheck(
            lambda x, s: fastnotes.expected_accuracy(x, labels, sigma=s, margin=1.5), (logits, sigma))


# ---- loss wrapper, module, alternatives -----------------------------------------------------------


def test_loss_reductions_and_meanlog(backend, rng):
    dtype = backend_dtype(backend)
    logits = torch.randn(6, 7, generator=rng, dtype=torch.float64).to(dtype).to(DEVICE)
    labels = torch.tensor([0, 1, -100, 3, 4, 5], device=DEVICE)
    prob = fastnotes.expected_accuracy(logits, labels, sigma=0.5).double().cpu()
    kept = labels.cpu() != -100
    none = fastnotes.exact_loss(logits, labels, sigma=0.5, reduction="none").double().cpu()
    assert torch.allclose(none, torch.where(kept, 1 - prob, 0.0), atol=1e-6)
    mean = fastnotes.exact_loss(logits, labels, sigma=0.5).item()
    assert mean == pytest.approx((1 - prob[kept]).mean().item(), abs=1e-6)
    meanlog = fastnotes.exact_loss(logits, labels, sigma=0.5, aggregation="meanlog", reduction="sum").item()
    assert meanlog == pytest.approx((-torch.log(prob[kept].clamp_min(1e-6))).sum().item(), rel=1e-5)


def test_smooth_accuracy_oracle():
    x = FULL_LOGITS.clone().requires_grad_()
    loss = fastnotes.smooth_accuracy_loss(x, torch.tensor([1, 3]), reduction="none")
    assert torch.allclose(loss, torch.tensor([0.39053996, 0.75414221], dtype=torch.float64), atol=1e-8)
    loss.sum().backward()
    expected = torch.tensor([[0.13664571, -0.2380185, 0.08287981, 0.01849299],
                             [0.07382898, 0.04477954, 0.06680322, -0.18541174]], dtype=torch.float64)
    assert torch.allclose(x.grad, expected, atol=1e-8)


def test_module_schedule_and_normalizer(rng):
    criterion = fastnotes.ExactLoss(sigma=1.0, decay=0.5, sigma_min=0.2)
    assert criterion.sigma == 1.0
    criterion.step_schedule()
    criterion.step_schedule()
    criterion.step_schedule()
    assert criterion.sigma == 0.2
    weight = torch.randn(4, 5, generator=rng, requires_grad=True)
    features = torch.randn(8, 4, generator=rng)
    criterion(features @ weight, torch.randint(0, 5, (8,), generator=rng)).backward()
    raw = torch.linalg.vector_norm(weight.grad).item()
    normalizer = fastnotes.GradientNormalizer([weight])
    normalizer()
    # the first call divides by the raw norm, floored at clip = 1e-2 (a confident model's gradient
    # can be smaller than that)
    assert torch.linalg.vector_norm(weight.grad).item() == pytest.approx(raw / max(raw, 1e-2), rel=1e-5)


def test_toy_problem_exact_reaches_full_accuracy():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "exact_toy.py"
    spec = importlib.util.spec_from_file_location("exact_toy", path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    results = toy.run()
    b_ce, acc_ce = results["cross-entropy"]
    b_hinge, acc_hinge = results["hinge"]
    b_exact, acc_exact = results["exact"]
    assert b_ce == pytest.approx(0.700, abs=0.01) and acc_ce == pytest.approx(2 / 3)
    assert 0.74 <= b_hinge <= 1.01 and acc_hinge == pytest.approx(2 / 3)
    assert 0 < b_exact < 0.25 and acc_exact == 1.0


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["target_shape", "target_dtype", "target_range", "sigma", "sigma_tensor",
                                  "margin", "nodes", "aggregation", "logits_dim"])
def test_bad_arguments(case):
    logits = torch.zeros(3, 4)
    target = torch.tensor([0, 1, 2])
    kwargs = {}
    error, match = ValueError, None
    if case == "target_shape":
        target, match = torch.tensor([0, 1]), "target must have shape"
    elif case == "target_dtype":
        target, error, match = torch.tensor([0.0, 1.0, 2.0]), TypeError, "target must have dtype"
    elif case == "target_range":
        target, match = torch.tensor([0, 4, 1]), r"target values must lie in \[0, 4\)"
    elif case == "sigma":
        kwargs["sigma"], match = -1.0, "sigma must be a finite number >= 0"
    elif case == "sigma_tensor":
        kwargs["sigma"], match = torch.tensor([1.0, -1e-30, 1.0]), "sigma must be finite and >= 0"
    elif case == "margin":
        kwargs["margin"], match = 0.0, "margin must be None or a positive"
    elif case == "nodes":
        kwargs["nodes"], match = 1, "nodes must be an int"
    elif case == "aggregation":
        kwargs["aggregation"], match = "median", "aggregation must be one of"
    elif case == "logits_dim":
        logits, match = torch.zeros(3, 4, 2), r"logits must be \[batch, classes\]"
    with pytest.raises(error, match=match):
        fastnotes.exact_loss(logits, target, **kwargs)


# ---- issue 18: precision of python-float sigma, the sigma -> 0 limit, infinite logits ----------------

CPU_FLOAT64_BACKENDS = [b for b in ("numba", "reference") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend_name", CPU_FLOAT64_BACKENDS)
def test_python_float_sigma_in_float64(backend_name, rng):
    """sigma = 0.6 as a Python float is 0.6 in float64, not float32's 0.6000000238 (6.7e-9 off in P)."""
    logits = torch.randn(5, 6, generator=rng, dtype=torch.float64)
    labels = torch.randint(0, 6, (5,), generator=rng)
    exact, _, _ = oracle(logits, labels, 0.6)
    with fastnotes.use_backend(backend_name):
        prob = fastnotes.expected_accuracy(logits, labels, sigma=0.6)
        loss = fastnotes.ExactLoss(sigma=0.6, standardize=False, reduction="none")(logits, labels)
    assert (prob - exact).abs().max().item() < 1e-13
    assert (loss - (1 - exact)).abs().max().item() < 1e-13


def hard_accuracy(logits, labels):
    """The sigma -> 0 limit: 1/k when the label is among the k tied maxima, else 0."""
    top = logits.max(dim=1, keepdim=True).values
    tied = (logits == top).sum(1).double()
    return torch.where(logits.gather(1, labels[:, None]).squeeze(1) == top.squeeze(1), 1 / tied, 0.0)


TIED = torch.tensor([[0.0, 0.0, -1.0, 0.0], [2.0, 2.0, 1.0, 0.0], [1.0, 3.0, 3.0, 3.0], [0.5, 0.0, 0.0, 0.0],
                     [1.0, 1.0, 1.0, 1.0]])
TIED_LABELS = torch.tensor([0, 1, 0, 0, 2])


@pytest.mark.parametrize("sigma", ["zero", "overflow", "tensor0", "rows"])
@pytest.mark.parametrize("margin", [None, 0.5])
def test_sigma_limit_is_hard_argmax(backend, sigma, margin):
    """sigma = 0, or so small that 1/sigma overflows the compute dtype: P is the hard argmax with ties
    split evenly, and the gradients are zero (not inf/NaN)."""
    dtype = backend_dtype(backend)
    overflow = 1e-44 if dtype == torch.float32 else 1e-320  # denormals: 1/sigma = inf
    sigma = {"zero": 0.0, "overflow": overflow, "tensor0": torch.tensor(0.0, dtype=dtype),
             "rows": torch.tensor([0.0, overflow, 0.0, overflow / 4, 0.0], dtype=dtype)}[sigma]
    x = TIED.to(dtype).to(DEVICE).clone().requires_grad_()
    prob = fastnotes.expected_accuracy(x, TIED_LABELS.to(DEVICE), sigma=sigma, margin=margin)
    prob.sum().backward()
    expected = hard_accuracy(TIED.double(), TIED_LABELS)
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    assert torch.allclose(prob.detach().double().cpu(), expected, atol=tol)
    assert (x.grad == 0).all()


@pytest.mark.parametrize("size", ["tiny", "huge"])
def test_tiny_and_huge_sigma_finite(backend, size):
    """Tiny sigma whose inverse still fits (1e-50 in float64 was 0 on the way through float32): P
    is the limit, tied rows get the huge but finite gradient G / sigma. Huge sigma: P -> 1/C.
    Both against the float64 reference."""
    dtype = backend_dtype(backend)
    sigma = 1e30 if size == "huge" else (1e-30 if dtype == torch.float32 else 1e-50)
    prob, grad, sig_grad = run(TIED.to(dtype), TIED_LABELS, sigma)
    exact, x, sig = oracle(TIED, TIED_LABELS, sigma)
    exact.sum().backward()
    for got, want in ((prob, exact.detach()), (grad, x.grad), (sig_grad, sig.grad)):
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-12 * max(1.0, want.abs().max().item()))
    if size == "tiny":
        assert torch.allclose(prob.double(), hard_accuracy(TIED.double(), TIED_LABELS), atol=1e-6)
        assert grad.abs().max() > 1e20
    else:
        assert torch.allclose(prob.double(), torch.full((5,), 0.25, dtype=torch.float64), atol=1e-6)


def test_infinite_logits(backend):
    """-inf masks a class out (as if its column were absent), +inf wins; ties of infinities are ties.
    Values and gradients stay finite, and no gradient reaches an infinite logit."""
    dtype = backend_dtype(backend)
    inf = float("inf")
    logits = torch.tensor([[0.3, -inf, -0.2, 0.1], [-inf, -inf, 0.0, 1.0], [inf, 0.0, -1.0, 2.0],
                           [inf, inf, 0.0, 1.0], [-inf, -inf, -inf, -inf]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 0, 1, 3])
    prob, grad, sig_grad = run(logits.to(dtype), labels, 0.7)
    assert torch.isfinite(prob).all() and torch.isfinite(grad).all() and torch.isfinite(sig_grad).all()
    # row 0 equals the finite problem without column 1; row 1 without columns 0, 1
    dropped0, _, _ = oracle(logits[:1, [0, 2, 3]], labels[:1], 0.7)
    dropped1, _, _ = oracle(logits[1:2, 2:], torch.tensor([0]), 0.7)
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    assert prob[0].item() == pytest.approx(dropped0.item(), abs=tol)
    assert prob[1].item() == pytest.approx(dropped1.item(), abs=tol)
    assert prob[2].item() == pytest.approx(1.0, abs=tol) and prob[3].item() == pytest.approx(0.5, abs=tol)
    assert prob[4].item() == pytest.approx(0.25, abs=1e-6)
    assert (grad[torch.isinf(logits)] == 0).all()
    exact, x, _ = oracle(logits, labels, 0.7)
    exact.sum().backward()
    assert torch.allclose(prob.double(), exact.detach(), atol=tol)
    assert torch.allclose(grad.double(), x.grad, atol=tol)


@pytest.mark.parametrize("sigma", [0.5, 0.0])
def test_nan_logit_gives_nan_row(backend, sigma):
    """A NaN logit (the label's or a competitor's) makes its row NaN, never a number; other rows
    are untouched. (The float32 CPU log Phi works on the bits and used to return ~1e38.)"""
    dtype = backend_dtype(backend)
    nan = float("nan")
    logits = torch.tensor([[0.0, nan, 1.0], [0.0, 1.0, 2.0], [nan, 0.0, 0.0], [0.5, 0.0, nan]], dtype=dtype)
    prob, grad, _ = run(logits, torch.tensor([0, 2, 1, -100]), sigma)
    assert torch.isnan(prob[[0, 2]]).all() and prob[3] == 1 and (grad[3] == 0).all()
    exact, x, _ = oracle(logits[1:2], torch.tensor([2]), sigma)
    assert prob[1].item() == pytest.approx(exact.item(), abs=1e-6) and torch.isfinite(grad[1]).all()


def test_unchecked_bad_rows_give_nan(backend, monkeypatch):
    """Off the CPU, target and sigma values are not checked (a host sync): a row with an out-of-range
    target, a negative or NaN sigma comes out NaN, and no out-of-range label is read. Emulated here
    by turning the CPU value checks off; the other rows are exact and every gradient finite."""
    monkeypatch.setattr(fastnotes.exact, "_check_values", lambda *args: None)
    dtype = backend_dtype(backend)
    logits = torch.tensor([[0.2, 0.0, -0.3], [0.1, 0.4, 0.0], [0.5, 0.0, 0.1], [0.0, 0.3, 0.2]], dtype=dtype)
    labels = torch.tensor([0, 7, 1, -3])
    sigma = torch.tensor([0.5, 0.5, -0.5, math.nan], dtype=dtype)
    prob, grad, sig_grad = run(logits, labels, sigma)
    assert torch.isnan(prob[1:]).all() and torch.isfinite(grad).all() and (grad[1:] == 0).all()
    assert torch.isfinite(sig_grad).all() and (sig_grad[1:] == 0).all()
    exact, _, _ = oracle(logits[:1], labels[:1], sigma[:1])
    assert prob[0].item() == pytest.approx(exact.item(), abs=1e-6)


def test_exact_loss_module_one_logit(backend):
    """ExactLoss standardises over the whole batch tensor: with a single logit ([1, 1]) the unbiased
    std is undefined. One class means P = 1: loss 0 and a zero (finite) gradient."""
    x = torch.full((1, 1), 0.3, dtype=backend_dtype(backend), device=DEVICE, requires_grad=True)
    loss = fastnotes.ExactLoss()(x, torch.tensor([0], device=DEVICE))
    loss.backward()
    assert abs(loss.item()) < 1e-6 and (x.grad == 0).all()


# ---- double backward and autocast -------------------------------------------------------------------


def test_double_backward(backend, rng):
    """The fused kernels' backward is not differentiable: a second derivative raises instead of being
    silently wrong; the reference path (plain autograd) gives the true one."""
    dtype = backend_dtype(backend)
    x = (torch.randn(3, 5, generator=rng, dtype=torch.float64)).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 4, 2], device=DEVICE)
    for fn in (lambda v: fastnotes.exact_loss(v, labels, sigma=0.8),
               lambda v: fastnotes.expected_accuracy(v, labels, sigma=0.8).sum()):
        g = torch.autograd.grad(fn(x), x, create_graph=True)[0]
        penalty = (g ** 2).sum() + x.sum()  # a graph that does not need g's own would hide the gap
        if backend == "reference":
            penalty.backward()
            assert torch.isfinite(x.grad).all() and (x.grad != 1).any()
            x.grad = None
        else:
            with pytest.raises(RuntimeError, match="cannot be differentiated again"):
                penalty.backward()
    if backend == "reference":
        labels_cpu = labels.cpu()
        assert torch.autograd.gradgradcheck(
            lambda v: fastnotes.expected_accuracy(v, labels_cpu, sigma=0.8, margin=1.0),
            (torch.randn(3, 5, generator=rng, dtype=torch.float64).requires_grad_(),))


def test_autocast_bfloat16(backend, rng):
    """Under CPU autocast a bf16 matmul feeds the op: it runs in float32 and returns float32 (as
    torch's losses do); the gradient reaches the float32 weights."""
    if DEVICE != "cpu":
        pytest.skip("CPU autocast")
    features = torch.randn(6, 8, generator=rng)
    weight = torch.randn(5, 8, generator=rng, requires_grad=True)
    labels = torch.tensor([0, 1, -100, 3, 4, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = features @ weight.T
        assert logits.dtype == torch.bfloat16
        loss = fastnotes.exact_loss(logits, labels, sigma=0.7)
        prob = fastnotes.expected_accuracy(logits, labels, sigma=0.7)
        module_loss = fastnotes.ExactLoss(sigma=0.7)(logits, labels)
    assert loss.dtype == prob.dtype == module_loss.dtype == torch.float32
    exact, _, _ = oracle(logits.float(), labels, 0.7)
    assert torch.allclose(prob.double(), exact, atol=2e-6)
    loss.backward()
    assert weight.grad.dtype == torch.float32
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().max() > 0
