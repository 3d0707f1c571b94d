"""sparse_multilabel_ce: positives as indices, on every backend against the float64 dense reference,
the spec oracles (G and the subtraction trap), padding, -inf logits and bad input."""
import math

import pytest
import torch
from conftest import DEVICE, available_backends
from oracle import FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes import reference


def backend_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def random_positives(lead, n_classes, k, gen):
    n = math.prod(lead)
    index = torch.stack([torch.randperm(n_classes, generator=gen)[:k] for _ in range(n)])
    index[::3, k // 2:] = -1
    index[1::5] = -1
    return index.reshape(*lead, k)


def check(logits, pos_index, gen, reduction="none"):
    upstream = torch.randn(logits.shape[:-1], generator=gen, dtype=torch.float64)
    x = logits.to(DEVICE).requires_grad_()
    loss = fastnotes.sparse_multilabel_ce(x, pos_index.to(DEVICE), reduction=reduction)
    loss.backward(upstream.to(DEVICE, loss.dtype) if reduction == "none" else None)
    results = []
    for dtype in (torch.float64, logits.dtype):  # exact, then the same-dtype composite
        xr = logits.detach().to(dtype).requires_grad_()
        ref = reference.sparse_multilabel_ce(xr, pos_index, reduction)
        ref.backward(upstream.to(dtype) if reduction == "none" else None)
        results.append((ref.detach(), xr.grad))
    (exact_loss, exact_grad), (same_loss, same_grad) = results
    for name, got, exact, same in (("loss", loss.detach(), exact_loss, same_loss), ("grad", x.grad, exact_grad, same_grad)):
        assert got.dtype == logits.dtype and got.shape == exact.shape
        assert_close_to_oracle(got, exact, same, FLOORS[logits.dtype], name)


@pytest.mark.parametrize("shape,k", [((7,), 3), ((4, 33), 5), ((2, 3, 64), 4), ((3, 2500), 20), ((5, 1000), 0)],
                         ids=str)
def test_random_inputs(backend, shape, k, rng):
    logits = (torch.randn(shape, generator=rng, dtype=torch.float64) * 3).to(backend_dtype(backend))
    check(logits, random_positives(shape[:-1], shape[-1], k, rng), rng)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction, rng):
    logits = (torch.randn(3, 4, 50, generator=rng, dtype=torch.float64) * 3).to(backend_dtype(backend))
    check(logits, random_positives((3, 4), 50, 6, rng), rng, reduction)


def test_inf_logits_and_large_values(backend, rng):
    """-inf removes a class, a positive included (ignored, bert4keras 2023); large logits stay finite."""
    dtype = backend_dtype(backend)
    logits = (torch.randn(4, 300, generator=rng, dtype=torch.float64) * 3).to(dtype)
    pos = random_positives((4,), 300, 5, rng)
    pos[0] = torch.tensor([3, 7, 11, -1, -1])
    logits[0, ::2] = float("-inf")  # a -inf negative and the -inf positives 3, 7, 11 ... odd: 3, 7, 11 stay
    logits[0, 4] = float("-inf")
    logits[1] = float("-inf")  # fully masked row
    logits[2, :100] = 1e4
    logits[3, :50] = -1e4
    check(logits, pos, rng)
    pos_masked = pos.clone()
    pos_masked[0, 3] = 4  # a positive at a -inf logit is ignored
    x = logits.to(DEVICE)
    a = fastnotes.sparse_multilabel_ce(x, pos_masked.to(DEVICE), reduction="none")
    b = fastnotes.sparse_multilabel_ce(x, pos.to(DEVICE), reduction="none")
    assert torch.equal(a, b) and a[1].item() == 0


def test_spec_oracle_g(backend):
    """docs/zlpr.md, 'Worked examples': sparse positives {2, 4} give the dense loss 1.4937509264."""
    dtype = backend_dtype(backend)
    s = torch.tensor([[0.3, -1.2, 2.5, -0.7, 1.1]], dtype=dtype, device=DEVICE, requires_grad=True)
    loss = fastnotes.sparse_multilabel_ce(s, torch.tensor([[4, -1, 2]], device=DEVICE))
    loss.backward()
    assert abs(loss.item() - 1.4937509264) < (1e-9 if dtype == torch.float64 else 2e-6)
    dense = torch.tensor([[0.3, -1.2, 2.5, -0.7, 1.1]], dtype=torch.float64, requires_grad=True)
    reference.multilabel_ce(dense, torch.tensor([[0, 0, 1, 0, 1]], dtype=torch.float64), None, "mean").backward()
    assert torch.allclose(s.grad.cpu().double(), dense.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("s_pos", [5.0, 10.0, 15.0, 20.0])
def test_trap_subtraction(backend, s_pos):
    """specs section 6 item 6: the neg part is 0.020012 for every s_pos (all-minus-positives gives
    -1.118 at 15 and 3.88 at 20 in float32)."""
    dtype = backend_dtype(backend)
    s = torch.tensor([[s_pos, -5.0, -5.0, -5.0]], dtype=dtype, device=DEVICE)
    neg_part = fastnotes.sparse_multilabel_ce(s, torch.tensor([[0]], device=DEVICE)).item() - math.log1p(math.exp(-s_pos))
    assert abs(neg_part - 0.020012) < 2e-6


def test_half_precision_cpu(rng):
    for dtype in (torch.float16, torch.bfloat16):
        logits = (torch.randn(6, 300, generator=rng) * 2).to(dtype)
        pos = random_positives((6,), 300, 4, rng)
        for backend in [b for b in available_backends("cpu") if b != "triton"]:
            with fastnotes.use_backend(backend):
                x = logits.clone().requires_grad_()
                loss = fastnotes.sparse_multilabel_ce(x, pos, reduction="sum")
                loss.backward()
            xr = logits.double().requires_grad_()
            exact = reference.sparse_multilabel_ce(xr, pos, "sum")
            exact.backward()
            assert loss.dtype == dtype and x.grad.dtype == dtype
            assert abs(loss.double().item() - exact.item()) <= 2e-2 * max(1, exact.item())
            assert torch.allclose(x.grad.double(), xr.grad, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend_name", [b for b in ("numba", "reference") if b in available_backends("cpu")])
def test_gradcheck(backend_name, rng):
    logits = torch.randn(4, 9, generator=rng, dtype=torch.float64).requires_grad_()
    pos = random_positives((4,), 9, 3, rng)
    with fastnotes.use_backend(backend_name):
        assert torch.autograd.gradcheck(lambda x: fastnotes.sparse_multilabel_ce(x, pos, reduction="none"), (logits,))


def test_int32_indices_and_inputs_untouched(backend, rng):
    dtype = backend_dtype(backend)
    logits = torch.randn(5, 40, generator=rng, dtype=torch.float64).to(dtype).to(DEVICE)
    pos = random_positives((5,), 40, 4, rng).to(DEVICE)
    before = (logits.clone(), pos.clone())
    x = logits.clone().requires_grad_()
    a = fastnotes.sparse_multilabel_ce(x, pos)
    a.backward()
    b = fastnotes.sparse_multilabel_ce(logits, pos.to(torch.int32))
    assert torch.equal(a.detach(), b)
    assert torch.equal(logits, before[0]) and torch.equal(pos, before[1])


@pytest.mark.parametrize("case", ["out_of_range", "below_padding", "duplicate", "lead_shape", "dtype", "logits_dtype",
                                  "reduction", "device", "scalar"])
def test_bad_arguments(case):
    logits = torch.zeros(3, 6, dtype=torch.float64)
    pos = torch.tensor([[0, 1], [5, -1], [-1, -1]])
    kwargs = {}
    error = ValueError
    if case == "out_of_range":
        pos[1, 0], match = 6, r"must lie in \[0, 6\)"
    elif case == "below_padding":
        pos[2, 0], match = -3, "must lie in"
    elif case == "duplicate":
        pos[1, 1], match = 5, "twice in row 1"
    elif case == "lead_shape":
        pos, match = pos[:2], "pos_index must have shape"
    elif case == "dtype":
        pos, error, match = pos.float(), TypeError, "pos_index must have dtype"
    elif case == "logits_dtype":
        logits, error, match = logits.long(), TypeError, "logits must have dtype"
    elif case == "reduction":
        kwargs["reduction"], match = "avg", "reduction"
    elif case == "device":
        pos, match = pos.to("meta"), "pos_index is on meta"
    elif case == "scalar":
        logits, match = torch.tensor(1.0), "at least one dimension"
    for backend in [b for b in available_backends("cpu") if b != "triton"]:
        with fastnotes.use_backend(backend), pytest.raises(error, match=match):
            fastnotes.sparse_multilabel_ce(logits, pos, **kwargs)


@pytest.mark.gpu
def test_bad_rows_nan_on_gpu():
    """On CUDA a bad index list (no host sync to raise) makes its row NaN; other rows are exact."""
    logits = torch.randn(3, 6, device="cuda")
    pos = torch.tensor([[0, 1], [6, -1], [2, 2]], device="cuda")
    rows = fastnotes.sparse_multilabel_ce(logits, pos, reduction="none")
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and torch.isnan(rows[2])


def test_plus_inf_logits_follow_the_reference(backend, rng):
    """+inf on a non-positive class: loss +inf and a NaN gradient at that entry only (as the dense
    op and the reference); +inf on a positive only removes its term. Also in a later column chunk."""
    dtype = backend_dtype(backend)
    logits = (torch.randn(3, 2500, generator=rng, dtype=torch.float64) * 3).to(dtype)
    pos = random_positives((3,), 2500, 4, rng)
    pos[0] = torch.tensor([5, 6, -1, -1])
    logits[0, 2200] = float("inf")
    pos[1] = torch.tensor([1900, 6, -1, -1])
    logits[1, 1900] = float("inf")
    upstream = torch.rand(3, generator=rng, dtype=torch.float64) + 0.5
    x = logits.to(DEVICE).requires_grad_()
    loss = fastnotes.sparse_multilabel_ce(x, pos.to(DEVICE), reduction="none")
    loss.backward(upstream.to(DEVICE, dtype))
    xr = logits.detach().double().requires_grad_()
    exact = reference.sparse_multilabel_ce(xr, pos, "none")
    exact.backward(upstream)
    assert loss[0].item() == float("inf") and torch.isfinite(loss[1:]).all()
    assert torch.allclose(loss[1:].cpu().double(), exact[1:].detach(), rtol=1e-5)
    assert torch.equal(x.grad.cpu().isnan(), xr.grad.isnan()) and x.grad[0].isnan().sum() == 1
    known = ~xr.grad.isnan()
    assert torch.allclose(x.grad.cpu()[known].double(), xr.grad[known], rtol=1e-5, atol=1e-6)


def test_double_backward_raises(backend, rng):
    x = (torch.randn(3, 20, generator=rng, dtype=torch.float64)).to(backend_dtype(backend)).to(DEVICE).requires_grad_()
    (g,) = torch.autograd.grad(fastnotes.sparse_multilabel_ce(x, random_positives((3,), 20, 3, rng).to(DEVICE)), x,
                               create_graph=True)
    if backend == "reference":
        torch.autograd.grad(g.square().sum() + x.sum(), x)
        return
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(g.square().sum() + x.sum(), x)
