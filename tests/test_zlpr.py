"""multilabel_ce (ZLPR) on every backend against the float64 reference and the spec oracles."""
import math

import pytest
import torch
from conftest import DEVICE, available_backends
from oracle import FLOORS, assert_close_to_oracle
from zlpr_cases import make_inputs, oracle, oracle_with_grad, run_op

import fastnotes
from fastnotes import reference


def backend_dtype(backend):
    """The widest dtype a backend runs on this machine: float64 where supported."""
    return torch.float32 if backend == "triton" else torch.float64


def check_against_oracle(backend, logits, targets, mask=None, gen=None):
    dtype = logits.dtype
    lead = logits.shape[:-1]
    upstream = torch.randn(lead, generator=gen, dtype=torch.float64) if gen is not None \
        else torch.ones(lead, dtype=torch.float64)
    loss, grad = run_op(logits.to(DEVICE), targets.to(DEVICE), None if mask is None else mask.to(DEVICE),
                        upstream.to(DEVICE))
    exact_loss, exact_grad = oracle_with_grad(logits, targets, mask, upstream)
    with fastnotes.use_backend("reference"):  # the same-dtype composite, for the tolerance rule
        comp_loss, comp_grad = run_op(logits, targets, mask, upstream)
    floor = FLOORS[dtype]
    assert_close_to_oracle(loss.cpu(), exact_loss, comp_loss, floor, f"{backend} loss")
    assert_close_to_oracle(grad.cpu(), exact_grad, comp_grad, floor, f"{backend} grad")
    assert loss.dtype == dtype and grad.dtype == dtype


# ---- random inputs -------------------------------------------------------------------------------

SHAPES = [(7,), (4, 33), (2, 3, 64), (5, 1000), (3, 2500)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["hard_bool", "hard_float", "hard_int", "soft"])
def test_random_inputs(backend, shape, kind, rng):
    logits, targets = make_inputs(shape, kind, rng, dtype=backend_dtype(backend))
    check_against_oracle(backend, logits, targets, gen=rng)


@pytest.mark.parametrize("mask_shape", ["full", "shared", "broadcast_rows"])
def test_mask(backend, mask_shape, rng):
    shape = (2, 3, 301)
    logits, targets = make_inputs(shape, "soft", rng, dtype=backend_dtype(backend))
    if mask_shape == "full":
        mask = torch.rand(shape, generator=rng) < 0.7
        mask[0, 1] = False  # a fully masked row
    elif mask_shape == "shared":
        mask = torch.rand(shape[-1], generator=rng) < 0.5
    else:
        mask = torch.rand(2, 1, shape[-1], generator=rng) < 0.5
    check_against_oracle(backend, logits, targets, mask, gen=rng)


def test_special_rows(backend, rng):
    """All-positive, all-negative, fully masked and -inf rows, odd C, large |logits| up to 1e4."""
    dtype = backend_dtype(backend)
    logits, targets = make_inputs((6, 257), "hard_float", rng, dtype=dtype)
    targets[0] = 1
    targets[1] = 0
    logits[2] = float("-inf")  # every class masked by -inf
    logits[3, ::3] = float("-inf")
    logits[4] = (torch.rand(257, generator=rng, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    logits[5] = 1e4
    targets[5, :100] = 0.5
    mask = torch.ones(6, 257, dtype=torch.bool)
    mask[1] = False
    check_against_oracle(backend, logits, targets, mask, gen=rng)
    loss, grad = run_op(logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE), torch.ones(6, device=DEVICE))
    assert loss[1].item() == 0 and loss[2].item() == 0, "fully masked rows must give loss 0"
    assert (grad[1] == 0).all() and (grad[2] == 0).all(), "fully masked rows must give gradient 0"


def test_non_contiguous_logits(backend, rng):
    dtype = backend_dtype(backend)
    base, _ = make_inputs((40, 30), "soft", rng, dtype=dtype)
    logits = base.t()[::2]  # [15, 40], neither row- nor column-contiguous
    assert not logits.is_contiguous()
    _, targets = make_inputs(logits.shape, "soft", rng, dtype=dtype)
    check_against_oracle(backend, logits, targets, gen=rng)


def test_tiny_soft_targets(backend, rng):
    """Targets far below float32 precision (the overflow path of the CPU kernel)."""
    dtype = backend_dtype(backend)
    logits = torch.full((3, 50), -100.0, dtype=dtype)
    targets = torch.zeros(3, 50, dtype=dtype)
    targets[0, 3] = 1e-30
    targets[1, :5] = 1e-12
    targets[2, 7] = 1e-36 if dtype == torch.float32 else 1e-200
    logits[2, 7] = -200.0
    check_against_oracle(backend, logits, targets)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction, rng):
    logits, targets = make_inputs((3, 4, 50), "soft", rng, dtype=backend_dtype(backend))
    x = logits.to(DEVICE).detach().clone().requires_grad_()
    loss = fastnotes.multilabel_ce(x, targets.to(DEVICE), reduction=reduction)
    exact = oracle(logits, targets, reduction=reduction)
    assert loss.shape == exact.shape
    assert torch.allclose(loss.double().cpu(), exact, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    xr = logits.detach().double().clone().requires_grad_()
    oracle(xr, targets, reduction=reduction).sum().backward()
    assert torch.allclose(x.grad.double().cpu(), xr.grad, rtol=1e-5, atol=1e-6)


def test_soft_target_gradient(backend, rng):
    """dL/dt = exp(-s - LA) - exp(s - LB), including the one-sided values at t = 0 and 1 on the
    fused backends; the reference refuses those (autograd through log t is NaN there)."""
    dtype = backend_dtype(backend)
    logits, targets = make_inputs((4, 40), "soft", rng, dtype=dtype)
    if backend == "reference":
        with pytest.raises(ValueError, match="only inside"):
            fastnotes.multilabel_ce(logits, targets.clone().requires_grad_())
        targets = targets.clamp(0.01, 0.99)
    mask = torch.rand(4, 40, generator=rng) < 0.8
    t = targets.to(DEVICE).requires_grad_()
    fastnotes.multilabel_ce(logits.to(DEVICE), t, mask=mask.to(DEVICE), reduction="sum").backward()
    s = logits.double()
    lse = oracle_lse(s, targets.double(), mask)
    expected = torch.where(mask, torch.exp(-s - lse[:, :1]) - torch.exp(s - lse[:, 1:]), 0.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(t.grad.double().cpu(), expected, rtol=tol, atol=tol)


def oracle_lse(s, t, mask):
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    zero = torch.zeros(s.shape[0], 1, dtype=torch.float64)
    a = torch.where(mask & (t > 0), -s + torch.log(t), ninf)
    b = torch.where(mask & (t < 1), s + torch.log1p(-t), ninf)
    return torch.stack([torch.logsumexp(torch.cat([a, zero], 1), 1), torch.logsumexp(torch.cat([b, zero], 1), 1)], 1)


def test_inputs_untouched(backend, rng):
    logits, targets = make_inputs((5, 77), "soft", rng, dtype=backend_dtype(backend))
    x = logits.to(DEVICE).detach().clone().requires_grad_()
    t = targets.to(DEVICE)
    before = (x.detach().clone(), t.clone())
    fastnotes.multilabel_ce(x, t).backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(t, before[1])


# ---- spec oracles (docs/zlpr.md, 'Worked examples') ---------------------------------------------

A_S = [2.0, -1.0, 0.5, -3.0]
ORACLES = {
    "A": (A_S, [1, 0, 0, 1], 4.1591158407, [-0.0063774609, 0.1219516523, 0.5465493873, -0.9464991226]),
    "B": ([-2.0, -3.0, -1.0], [0, 0, 0], 0.4401896986, [0.0871443187, 0.0320586033, 0.2368828181]),
    "C": ([0.0] * 5, [1, 1, 0, 0, 0], 2.4849066498, [-1 / 3, -1 / 3, 0.25, 0.25, 0.25]),
    "D": ([1.0, -0.5, 0.0, 2.0], [0.9, 0.2, 0.5, 0.0], 3.0370496706,
          [-0.1250437281, -0.1022977144, -0.1795575781, 0.7660141768]),
    "E": ([1.0986122887, -0.6931471806, 0.0, 0.4236489302, -2.2975599251], [0.9, 0.2, 0.5, 0.7, 0.01],
          2.0288348382, [0.0] * 5),
    "F": ([2.0, -1.0, float("-inf"), 0.5, float("-inf")], [1, 0, 0, 0, 0], 1.2310586164,
          [-0.119202922, 0.1219516523, 0.0, 0.5465493873, 0.0]),
    # G: the sparse positives {2, 4} as a dense row
    "G": ([0.3, -1.2, 2.5, -0.7, 1.1], [0, 0, 1, 0, 1], 1.4937509264, None),
}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_spec_oracle(backend, name):
    s, t, loss_expected, grad_expected = ORACLES[name]
    dtype = backend_dtype(backend)
    loss, grad = run_op(torch.tensor([s], dtype=dtype, device=DEVICE), torch.tensor([t], dtype=dtype, device=DEVICE),
                        None, torch.ones(1, device=DEVICE))
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    assert abs(loss.item() - loss_expected) <= tol * max(1, loss_expected)
    if grad_expected is not None:
        assert torch.allclose(grad[0].double().cpu(), torch.tensor(grad_expected, dtype=torch.float64),
                              atol=1e-9 if dtype == torch.float64 else 1e-6, rtol=0)


def test_spec_oracle_h_mean(backend):
    dtype = backend_dtype(backend)
    s = torch.tensor([A_S, [0.0] * 4], dtype=dtype, device=DEVICE)
    y = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool, device=DEVICE)
    per_row = fastnotes.multilabel_ce(s, y, reduction="none")
    assert torch.allclose(per_row.double().cpu(), torch.tensor([4.1591158407, 2.0794415417], dtype=torch.float64),
                          atol=1e-6, rtol=0)
    assert abs(fastnotes.multilabel_ce(s, y).item() - 3.1192786912) < 1e-6


def test_spec_oracle_i_threshold(backend):
    dtype = backend_dtype(backend)
    s = torch.tensor([A_S], dtype=dtype, device=DEVICE) - 0.7
    y = torch.tensor([[1, 0, 0, 1]], device=DEVICE)
    assert abs(fastnotes.multilabel_ce(s, y).item() - 4.4248307720) < 1e-6


def test_trap_clipping(backend):
    """specs section 6 item 5: naive clipping gives 9 999 984; the exact value is 0.126928."""
    dtype = backend_dtype(backend)
    loss = fastnotes.multilabel_ce(torch.tensor([[2.0, -1e7]], dtype=dtype, device=DEVICE),
                                   torch.tensor([[1.0, 0.0]], dtype=dtype, device=DEVICE))
    assert abs(loss.item() - 0.126928) < 1e-6


@pytest.mark.parametrize("s_pos", [5.0, 10.0, 15.0, 20.0])
def test_trap_subtraction(backend, s_pos):
    """specs section 6 item 6: the neg part is 0.020012 whatever the positive's score."""
    dtype = backend_dtype(backend)
    s = torch.tensor([[s_pos, -5.0, -5.0, -5.0]], dtype=dtype, device=DEVICE)
    y = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype, device=DEVICE)
    neg_part = fastnotes.multilabel_ce(s, y).item() - math.log1p(math.exp(-s_pos))
    assert abs(neg_part - 0.020012) < 2e-6


def test_fp16_large_logits_finite():
    """The 1e12 trick overflows fp16; the fused op must not (reference and every CPU backend)."""
    s = torch.tensor([[60000.0, -60000.0, 3.0, -2.0]], dtype=torch.float16)
    y = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    for backend in [b for b in available_backends("cpu") if b != "triton"]:
        with fastnotes.use_backend(backend):
            x = s.clone().requires_grad_()
            loss = fastnotes.multilabel_ce(x, y)
            loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), backend
        expected = oracle(s, y).item()
        assert abs(loss.float().item() - expected) <= 1e-3 * max(1, expected), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(dtype, rng):
    """float16/bfloat16 on the CPU backends (numba widens to float32)."""
    logits, targets = make_inputs((6, 300), "soft", rng, dtype=dtype, scale=2.0)
    for backend in [b for b in available_backends("cpu") if b != "triton"]:
        with fastnotes.use_backend(backend):
            loss, grad = run_op(logits, targets, None, torch.ones(6, dtype=torch.float64))
        exact_loss, exact_grad = oracle_with_grad(logits, targets, None, torch.ones(6, dtype=torch.float64))
        assert loss.dtype == dtype and grad.dtype == dtype
        assert torch.allclose(loss.double(), exact_loss, rtol=FLOORS[dtype], atol=FLOORS[dtype])
        assert torch.allclose(grad.double(), exact_grad, rtol=FLOORS[dtype], atol=FLOORS[dtype])


def test_module(backend, rng):
    logits, targets = make_inputs((3, 20), "hard_bool", rng, dtype=backend_dtype(backend))
    module = fastnotes.MultilabelCE(reduction="sum")
    assert "sum" in repr(module)
    got = module(logits.to(DEVICE), targets.to(DEVICE))
    assert abs(got.item() - oracle(logits, targets, reduction="sum").item()) < 1e-4


def test_empty_inputs(backend):
    dtype = backend_dtype(backend)
    x = torch.zeros(0, 5, dtype=dtype, device=DEVICE, requires_grad=True)
    out = fastnotes.multilabel_ce(x, torch.zeros(0, 5, device=DEVICE), reduction="sum")
    out.backward()
    assert out.item() == 0 and x.grad.shape == (0, 5)
    row = fastnotes.multilabel_ce(torch.zeros(3, 0, dtype=dtype, device=DEVICE), torch.zeros(3, 0, device=DEVICE),
                                  reduction="none")
    assert torch.equal(row.cpu(), torch.zeros(3, dtype=dtype))


# ---- gradcheck ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", [b for b in ("numba", "reference") if b in available_backends("cpu")])
def test_gradcheck(backend_name, rng):
    logits, targets = make_inputs((3, 11), "soft", rng, dtype=torch.float64)
    targets = targets.clamp(0.05, 0.95)  # interior targets: dL/dt is two-sided there
    mask = torch.rand(3, 11, generator=rng) < 0.8
    x = logits.requires_grad_()
    t = targets.requires_grad_()
    with fastnotes.use_backend(backend_name):
        assert torch.autograd.gradcheck(
            lambda a, b: fastnotes.multilabel_ce(a, b, mask=mask, reduction="none"), (x, t))


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_targets_values(backend):
    dtype = backend_dtype(backend)
    logits = torch.zeros(2, 4, dtype=dtype, device=DEVICE)
    for bad in (1.5, -0.1, float("nan")):
        targets = torch.zeros(2, 4, dtype=dtype, device=DEVICE)
        targets[1, 2] = bad
        if DEVICE == "cpu":
            with pytest.raises(ValueError, match="targets must lie in"):
                fastnotes.multilabel_ce(logits, targets)
        else:
            assert torch.isnan(fastnotes.multilabel_ce(logits, targets, reduction="none")[1])
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="targets"):
            fastnotes.multilabel_ce(logits, torch.full((2, 4), 2, device=DEVICE))


@pytest.mark.parametrize("case", ["shape", "logits_dtype", "mask_dtype", "mask_shape", "reduction",
                                  "device", "not_tensor", "scalar"])
def test_bad_arguments(case):
    logits = torch.zeros(2, 4)
    targets = torch.zeros(2, 4)
    kwargs = {}
    error, match = ValueError, None
    if case == "shape":
        targets, match = torch.zeros(2, 5), "targets must have the shape"
    elif case == "logits_dtype":
        logits, error, match = torch.zeros(2, 4, dtype=torch.int64), TypeError, "logits must have dtype"
    elif case == "mask_dtype":
        kwargs["mask"], error, match = torch.ones(2, 4), TypeError, "mask must have dtype bool"
    elif case == "mask_shape":
        kwargs["mask"], match = torch.ones(3, 4, dtype=torch.bool), "mask"
    elif case == "reduction":
        kwargs["reduction"], match = "avg", "reduction must be one of"
    elif case == "device":
        targets, match = torch.zeros(2, 4, device="meta"), "targets is on meta"
    elif case == "not_tensor":
        targets, error, match = [[0.0] * 4] * 2, TypeError, "targets must be a torch.Tensor"
    elif case == "scalar":
        logits, targets, match = torch.tensor(1.0), torch.tensor(1.0), "at least one dimension"
    with pytest.raises(error, match=match):
        fastnotes.multilabel_ce(logits, targets, **kwargs)


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 1000), (512, 50000), (8, 500000)], ids=str)
def test_triton_gpu_sizes(dtype, shape, rng):
    logits, targets = make_inputs(shape, "hard_bool", rng, dtype=dtype)
    with fastnotes.use_backend("triton"):
        check_against_oracle("triton", logits, targets, gen=rng)


def test_reference_matches_composite_on_hard_labels(rng):
    """The benchmarks' 1e12 composite agrees with the reference where it is valid (hard, fp64)."""
    logits, targets = make_inputs((4, 200), "hard_bool", rng, dtype=torch.float64)
    assert torch.allclose(reference.multilabel_ce_composite(logits, targets), oracle(logits, targets), atol=1e-9)


def test_overflow_path_then_later_chunks(backend, rng):
    """float32 logits ~200 above the running lse take the numba kernel's overflow path; later
    1024-wide chunks of the same row must then use that stream's own new maximum (a slip there
    gave 211.9 for 206.3). Positive and negative streams, in the first and in a later chunk."""
    logits, targets = make_inputs((5, 3000), "hard_float", rng, dtype=torch.float32)
    logits[0, 0], targets[0, 0] = 200.0, 0.0
    logits[1, 2100], targets[1, 2100] = 150.0, 0.0
    logits[2, 5], targets[2, 5] = -180.0, 1.0
    logits[3, 1500], targets[3, 1500] = -120.0, 1.0
    logits[4, 0], targets[4, 0] = 200.0, 0.0
    logits[4, 2999], targets[4, 2999] = -200.0, 1.0
    check_against_oracle(backend, logits, targets, gen=rng)


def test_infinite_logits_follow_the_math(backend, rng):
    """+inf on a class of the negative stream (t < 1): loss +inf, NaN gradient at that entry (no
    derivative at infinity, so GradScaler skips the step as with torch's losses), the other
    entries their finite limit; +inf on a positive (t = 1) only removes its term; -inf removes the
    class. Every backend gives what the reference gives, also past the first 1024-column chunk."""
    dtype = backend_dtype(backend)
    logits, targets = make_inputs((6, 2500), "soft", rng, dtype=dtype)
    inf = float("inf")
    logits[0, 0], targets[0, 0] = inf, 0.0
    logits[1, 1800], targets[1, 1800] = inf, 0.3
    logits[1, 7], targets[1, 7] = inf, 0.0
    logits[2, 2000], targets[2, 2000] = inf, 1.0
    logits[3, 10], targets[3, 10] = -inf, 1.0
    logits[4, 1200], targets[4, 1200] = inf, 0.0
    logits[4, 1201], targets[4, 1201] = -inf, 0.0
    upstream = torch.rand(6, generator=rng, dtype=torch.float64) + 0.5
    loss, grad = run_op(logits.to(DEVICE), targets.to(DEVICE), None, upstream.to(DEVICE))
    exact_loss, exact_grad = oracle_with_grad(logits, targets, None, upstream)
    assert torch.equal(torch.isinf(loss.cpu()), torch.isinf(exact_loss)) and not loss.isnan().any()
    assert torch.isinf(exact_loss[[0, 1, 4]]).all() and torch.isfinite(exact_loss[[2, 3, 5]]).all()
    assert torch.equal(grad.cpu().isnan(), exact_grad.isnan()), "NaN gradients only where the reference has them"
    finite = torch.isfinite(exact_loss)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(loss.cpu()[finite].double(), exact_loss[finite], rtol=tol, atol=tol)
    known = ~exact_grad.isnan()
    assert torch.allclose(grad.cpu()[known].double(), exact_grad[known], rtol=1e-5, atol=tol)


def test_double_backward_raises(backend, rng):
    """The kernels' backward is not differentiable: a gradient penalty must fail loudly, never
    silently add nothing (the reference backend is plain torch and differentiates twice)."""
    logits, targets = make_inputs((3, 20), "soft", rng, dtype=backend_dtype(backend))
    x = logits.to(DEVICE).requires_grad_()
    (g,) = torch.autograd.grad(fastnotes.multilabel_ce(x, targets.to(DEVICE)), x, create_graph=True)
    if backend == "reference":
        torch.autograd.grad(g.square().sum() + x.sum(), x)
        return
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(g.square().sum() + x.sum(), x)


def test_autocast_cpu(rng):
    """Logits from a linear layer under CPU autocast are bfloat16: the loss comes out float32, as
    torch's losses do under autocast, and matches the float64 reference."""
    hidden = torch.randn(6, 16, generator=rng)
    weight = torch.randn(30, 16, generator=rng, requires_grad=True)
    targets = torch.rand(6, 30, generator=rng) < 0.3
    for name in [b for b in available_backends("cpu") if b != "triton"]:  # the interpreter has no bfloat16
        with fastnotes.use_backend(name), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(hidden, weight)
            loss = fastnotes.multilabel_ce(logits, targets)
        (grad,) = torch.autograd.grad(loss, weight)
        expected = oracle(logits.detach(), targets, reduction="mean")
        assert logits.dtype == torch.bfloat16 and loss.dtype == grad.dtype == torch.float32, name
        assert abs(loss.double().item() - expected.item()) <= 1e-5 * max(1.0, expected.item()), name
