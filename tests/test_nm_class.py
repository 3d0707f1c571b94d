"""nm_class_ce (the experimental n x m classification loss L1) on every backend against the float64
reference, the spec oracles N1-N3, N5, N6, padding, gradcheck and bad input."""
import math

import pytest
import torch
from conftest import DEVICE, available_backends
from oracle import FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes import reference

CPU_BACKENDS = [b for b in ("numba", "reference") if b in available_backends("cpu")]


def backend_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def make_targets(shape, kind, gen, dtype):
    *lead, n, m = shape
    if kind == "hard":
        labels = torch.randint(0, m, (*lead, n), generator=gen)
        labels[..., ::4] = -1  # padding tasks
        return labels
    soft = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, -1)
    hard = torch.nn.functional.one_hot(torch.randint(0, m, (*lead, n), generator=gen), m).double()
    soft = torch.where(torch.rand((*lead, n, 1), generator=gen) < 0.3, hard, soft)  # exact 0/1 rows mixed in
    soft[..., n // 2, :] = 0 if n > 1 else soft[..., n // 2, :]  # a padding task
    return soft.to(dtype)


def check(logits, targets, gen, reduction="none"):
    upstream = torch.randn(logits.shape[:-2], generator=gen, dtype=torch.float64)
    x = logits.to(DEVICE).requires_grad_()
    loss = fastnotes.nm_class_ce(x, targets.to(DEVICE), reduction=reduction)
    loss.backward(upstream.to(DEVICE, loss.dtype) if reduction == "none" else None)
    results = []
    for dtype in (torch.float64, logits.dtype):
        xr = logits.detach().to(dtype).requires_grad_()
        t = targets if not targets.dtype.is_floating_point else targets.to(dtype)
        ref = reference.nm_class_ce(xr, t, reduction)
        ref.backward(upstream.to(dtype) if reduction == "none" else None)
        results.append((ref.detach(), xr.grad))
    (exact_loss, exact_grad), (same_loss, same_grad) = results
    for name, got, exact, same in (("loss", loss.detach(), exact_loss, same_loss), ("grad", x.grad, exact_grad, same_grad)):
        assert got.dtype == logits.dtype and got.shape == exact.shape, name
        assert_close_to_oracle(got, exact, same, FLOORS[logits.dtype], name)


@pytest.mark.parametrize("shape", [(1, 3), (4, 5, 7), (2, 3, 9, 2), (3, 33, 10)], ids=str)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_random_inputs(backend, shape, kind, rng):
    logits = (torch.randn(shape, generator=rng, dtype=torch.float64) * 3).to(backend_dtype(backend))
    check(logits, make_targets(shape, kind, rng, backend_dtype(backend)), rng)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction, rng):
    shape = (3, 2, 6, 4)
    logits = (torch.randn(shape, generator=rng, dtype=torch.float64) * 3).to(backend_dtype(backend))
    check(logits, make_targets(shape, "hard", rng, backend_dtype(backend)), rng, reduction)


def test_extreme_logits(backend, rng):
    """p -> 1 on a target (log1mexp -> -inf: the term vanishes) and large spreads stay finite."""
    dtype = backend_dtype(backend)
    logits = (torch.randn(2, 5, 6, generator=rng, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 6, (2, 5), generator=rng)
    logits[0, 0] = -1e3
    logits[0, 0, labels[0, 0]] = 1e3
    logits[1, 2] *= 100
    check(logits, labels, rng)


def test_padding_and_empty_block(backend, rng):
    """Padding tasks (t = 0 rows) leave loss and gradient unchanged; an all-padding block gives 0."""
    dtype = backend_dtype(backend)
    logits = (torch.randn(1, 4, 5, generator=rng, dtype=torch.float64) * 2).to(dtype).to(DEVICE)
    labels = torch.tensor([[1, 3, 3, 0]], device=DEVICE)
    padded_logits = torch.cat([logits, torch.randn(1, 3, 5, generator=rng, dtype=torch.float64).to(dtype).to(DEVICE)], 1)
    padded_labels = torch.cat([labels, torch.full((1, 3), -1, device=DEVICE)], 1)
    x = logits.clone().requires_grad_()
    xp = padded_logits.clone().requires_grad_()
    a = fastnotes.nm_class_ce(x, labels, reduction="sum")
    b = fastnotes.nm_class_ce(xp, padded_labels, reduction="sum")
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) < 1e-6 * max(1, a.item())
    assert torch.allclose(xp.grad[:, :4], x.grad, atol=1e-6) and (xp.grad[:, 4:] == 0).all()
    empty = torch.randn(2, 3, 4, dtype=dtype, device=DEVICE, requires_grad=True)
    out = fastnotes.nm_class_ce(empty, torch.zeros(2, 3, 4, dtype=dtype, device=DEVICE), reduction="sum")
    out.backward()
    assert out.item() == 0 and (empty.grad == 0).all()


# ---- spec oracles (docs/nm_class.md, 'Worked examples') -------------------------------------------


def test_oracle_n1_n2(backend):
    dtype = backend_dtype(backend)
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    s = torch.tensor([[2, 0.5, -1], [0, 1, 1.5]], dtype=dtype, device=DEVICE, requires_grad=True)
    loss = fastnotes.nm_class_ce(s, torch.tensor([0, 2], device=DEVICE), reduction="sum")
    loss.backward()
    assert abs(loss.item() - 0.8454419020) < tol
    expected = torch.tensor([[-0.21440297, 0.17529039, 0.03911257], [0.12195165, 0.33149896, -0.45345061]],
                            dtype=torch.float64)
    assert torch.allclose(s.grad.cpu().double(), expected, atol=1e-8 if dtype == torch.float64 else 2e-6, rtol=0)
    # the same block as soft one-hot targets
    soft = torch.tensor([[1.0, 0, 0], [0, 0, 1]], dtype=dtype, device=DEVICE)
    assert abs(fastnotes.nm_class_ce(s.detach(), soft).item() - 0.8454419020) < tol
    # N2: both tasks -> class 0; smaller than the summed CE 0.92159
    s2 = torch.tensor([[2, 0.5, -1], [1, 0, 0.5]], dtype=dtype, device=DEVICE)
    value = fastnotes.nm_class_ce(s2, torch.tensor([0, 0], device=DEVICE)).item()
    assert abs(value - 0.8097416566) < tol
    assert abs(value - math.log(1 + math.exp(-1.5) + math.exp(-3) + math.exp(-1) + math.exp(-0.5))) < tol


def test_oracle_n3_m2_is_soft_zlpr(backend):
    """m = 2: L1 equals soft ZLPR of d = s_1 - s_2 with target t_1 (1.6596983979)."""
    dtype = backend_dtype(backend)
    s = torch.tensor([[0.7, -0.3], [-1, 0.4], [2, 2.5]], dtype=dtype, device=DEVICE)
    t1 = torch.tensor([0.9, 0.2, 0.5], dtype=dtype, device=DEVICE)
    value = fastnotes.nm_class_ce(s, torch.stack([t1, 1 - t1], -1)).item()
    assert abs(value - 1.6596983979) < (1e-9 if dtype == torch.float64 else 2e-6)
    d = torch.tensor([[0.7 + 0.3, -1 - 0.4, 2 - 2.5]], dtype=torch.float64)
    zlpr = reference.multilabel_ce(d, torch.tensor([[0.9, 0.2, 0.5]], dtype=torch.float64), None, "sum").item()
    assert abs(zlpr - 1.6596983979) < 1e-9


def test_oracle_n5(backend):
    dtype = backend_dtype(backend)
    s = torch.tensor([[10.0, 5, -5]], dtype=dtype, device=DEVICE)
    assert abs(fastnotes.nm_class_ce(s, torch.tensor([1], device=DEVICE)).item() - 5.0067156523) < 5e-6


def test_oracle_n6_soft_minimiser_is_not_t():
    """The known limitation: with soft t = [0.6, 0.3, 0.1] (n = 1) the minimiser of L1 is
    softmax(s*) = [0.4572, 0.3349, 0.2078], loss 1.3280354697, not t."""
    t = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    for backend in CPU_BACKENDS:
        with fastnotes.use_backend(backend):
            s = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([s], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                    line_search_fn="strong_wolfe")

            def closure(opt=opt, s=s):
                opt.zero_grad()
                loss = fastnotes.nm_class_ce(s, t)
                loss.backward()
                return loss

            opt.step(closure)
            p = torch.softmax(s.detach(), -1)[0]
            assert torch.allclose(p, torch.tensor([0.45724662, 0.33491076, 0.20784262], dtype=torch.float64), atol=1e-6)
            assert abs(fastnotes.nm_class_ce(s.detach(), t).item() - 1.3280354697) < 1e-9


# ---- gradcheck and bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_gradcheck(backend_name, rng):
    logits = torch.randn(2, 3, 4, generator=rng, dtype=torch.float64).requires_grad_()
    targets = make_targets((2, 3, 4), "soft", rng, torch.float64)
    with fastnotes.use_backend(backend_name):
        assert torch.autograd.gradcheck(lambda x: fastnotes.nm_class_ce(x, targets, reduction="none"), (logits,))


@pytest.mark.parametrize("case", ["label_range", "soft_range", "shape_hard", "shape_soft", "bool", "logits_dtype",
                                  "dim", "reduction", "device", "targets_grad"])
def test_bad_arguments(case):
    logits = torch.zeros(2, 3, 4, dtype=torch.float64)
    targets = torch.zeros(2, 3, dtype=torch.int64)
    kwargs = {}
    error = ValueError
    if case == "label_range":
        targets[1, 1], match = 4, "must be < m = 4"
    elif case == "soft_range":
        targets, match = torch.full((2, 3, 4), 1.5, dtype=torch.float64), r"lie in \[0, 1\]"
    elif case == "shape_hard":
        targets, match = torch.zeros(2, 4, dtype=torch.int64), "integer targets must have shape"
    elif case == "shape_soft":
        targets, match = torch.zeros(2, 3, 5, dtype=torch.float64), "soft targets must have shape"
    elif case == "bool":
        targets, error, match = targets.bool(), TypeError, "integer classes"
    elif case == "logits_dtype":
        logits, error, match = logits.long(), TypeError, "logits must have dtype"
    elif case == "dim":
        logits, targets, match = torch.zeros(4, dtype=torch.float64), torch.zeros((), dtype=torch.int64), r"\[..., n, m\]"
    elif case == "reduction":
        kwargs["reduction"], match = "avg", "reduction"
    elif case == "device":
        targets, match = targets.to("meta"), "targets is on meta"
    elif case == "targets_grad":
        targets, match = torch.full((2, 3, 4), 0.25, dtype=torch.float64, requires_grad=True), "no gradient for targets"
    for backend in CPU_BACKENDS:
        with fastnotes.use_backend(backend), pytest.raises(error, match=match):
            fastnotes.nm_class_ce(logits, targets, **kwargs)


def test_plus_inf_logits_raise_on_cpu(rng):
    logits = torch.randn(2, 3, 4, generator=rng)
    logits[1, 2, 0] = float("inf")
    for name in available_backends("cpu"):
        with fastnotes.use_backend(name), pytest.raises(ValueError, match=r"logits must not be \+inf"):
            fastnotes.nm_class_ce(logits, torch.tensor([[0, 1, 2], [3, 0, 1]]))


def test_minus_inf_logits(backend, rng):
    """-inf on classes a task does not take: p = 0 there, the loss as the reference's."""
    logits = (torch.randn(3, 4, 6, generator=rng, dtype=torch.float64) * 2).to(backend_dtype(backend))
    targets = torch.randint(0, 6, (3, 4), generator=rng)
    blocked = torch.rand(3, 4, 6, generator=rng) < 0.3
    blocked.scatter_(-1, targets.unsqueeze(-1), False)
    check(logits.masked_fill(blocked, float("-inf")), targets, rng)


def test_double_backward_raises(backend, rng):
    x = torch.randn(2, 3, 5, generator=rng, dtype=backend_dtype(backend), device=DEVICE, requires_grad=True)
    loss = fastnotes.nm_class_ce(x, torch.randint(0, 5, (2, 3), generator=rng).to(DEVICE))
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    if backend == "reference":  # plain torch: differentiable twice
        torch.autograd.grad(g.square().sum() + x.sum(), x)
        return
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(g.square().sum() + x.sum(), x)


def test_autocast_cpu(rng):
    """Under CPU autocast (bf16 logits from a linear layer) the loss is float32, as torch's losses
    under autocast, and matches the reference."""
    hidden = torch.randn(2, 3, 8, generator=rng)
    weight = torch.randn(5, 8, generator=rng, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, weight)
        loss = fastnotes.nm_class_ce(logits, targets)
        expected = reference.nm_class_ce(logits.detach().double(), targets)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == weight.grad.dtype == torch.float32
    assert abs(loss.double().item() - expected.item()) <= 1e-5 * max(1.0, expected.abs().item())


def test_a_class_without_competitors(backend, rng):
    """Every class but the target at -inf: p = 1, the task adds nothing and has zero gradient."""
    logits = torch.randn(2, 3, 4, generator=rng, dtype=torch.float64).to(backend_dtype(backend))
    targets = torch.tensor([[0, 1, 2], [3, 3, 0]])
    alone = torch.ones(2, 3, 4, dtype=torch.bool)
    alone.scatter_(-1, targets.unsqueeze(-1), False)
    alone[1, 2] = False  # one task keeps its competitors
    check(logits.masked_fill(alone, float("-inf")), targets, rng)
