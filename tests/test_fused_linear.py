"""fused_linear_multilabel_ce: every backend against autograd through the materialised float64
composite (F.linear + reference ZLPR), the spec oracle, gradcheck, bad input, a training run."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backends
from oracle import FLOORS, assert_close_to_oracle

import fastnotes
from fastnotes import reference

CPU_BACKENDS = [b for b in ("numba", "reference") if b in available_backends("cpu")]


@pytest.fixture(params=available_backends(), ids=lambda b: b)
def backend(request):
    with fastnotes.use_backend(request.param):
        yield request.param


def backend_dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def make_case(n, d, c, gen, dtype, kind="sparse", with_bias=True, k=4):
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(c, d, generator=gen, dtype=torch.float64) * 2 / math.sqrt(d)).to(dtype)
    bias = (torch.randn(c, generator=gen, dtype=torch.float64) - 1).to(dtype) if with_bias else None
    pos_index = torch.stack([torch.randperm(c, generator=gen)[:k] for _ in range(n)])
    pos_index[::3, k // 2:] = -1  # padding
    pos_index[1::4] = -1  # rows without positives
    if kind == "sparse":
        return hidden, weight, bias, None, pos_index
    dense = reference.positives_as_targets(pos_index, c, torch.float64)
    if kind == "soft":
        soft = torch.rand(n, c, generator=gen, dtype=torch.float64)
        dense = torch.where(torch.rand(n, c, generator=gen, dtype=torch.float64) < 0.5, dense, soft).to(dtype)
    elif kind == "bool":
        dense = dense.bool()
    return hidden, weight, bias, dense, None


def run(fn, hidden, weight, bias, targets, pos_index, reduction, upstream, **kwargs):
    """(loss, grad_hidden, grad_weight, grad_bias) of fn with fresh leaves."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fn(h, w, targets, pos_index=pos_index, bias=b, reduction=reduction, **kwargs)
    loss.backward(upstream.to(loss.dtype) if reduction == "none" else None)
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def composite(h, w, targets, pos_index=None, bias=None, reduction="mean"):
    """Autograd through the materialised logits (the reference, in the inputs' dtype)."""
    return reference.fused_linear_multilabel_ce(h, w, targets, pos_index, bias, reduction)


def check(case, reduction, gen, **kwargs):
    hidden, weight, bias, targets, pos_index = case
    dtype = hidden.dtype
    upstream = torch.randn(hidden.shape[:-1], generator=gen, dtype=torch.float64)
    got = run(fastnotes.fused_linear_multilabel_ce, hidden.to(DEVICE), weight.to(DEVICE),
              None if bias is None else bias.to(DEVICE), None if targets is None else targets.to(DEVICE),
              None if pos_index is None else pos_index.to(DEVICE), reduction, upstream.to(DEVICE), **kwargs)
    t64 = None if targets is None else (targets if targets.dtype == torch.bool else targets.double())
    exact = run(composite, hidden.double(), weight.double(), None if bias is None else bias.double(), t64,
                pos_index, reduction, upstream)
    same = run(composite, hidden, weight, bias, targets, pos_index, reduction, upstream)
    for name, g, e, s in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, exact, same):
        if e is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == e.shape, name
        assert_close_to_oracle(g, e, s, FLOORS[dtype], name)


@pytest.mark.parametrize("kind", ["sparse", "bool", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_random_inputs(backend, kind, reduction, rng):
    case = make_case(13, 24, 37, rng, backend_dtype(backend), kind)
    check(case, reduction, rng, chunk_size=5)  # chunks that do not divide N


@pytest.mark.parametrize("chunk_size", [None, 1, 64])
def test_chunk_sizes_and_no_bias(backend, chunk_size, rng):
    case = make_case(9, 16, 70, rng, backend_dtype(backend), "sparse", with_bias=False)
    check(case, "mean", rng, chunk_size=chunk_size)


def test_leading_dimensions(backend, rng):
    hidden, weight, bias, targets, _ = make_case(12, 8, 20, rng, backend_dtype(backend), "soft")
    case = (hidden.reshape(3, 4, 8), weight, bias, targets.reshape(3, 4, 20), None)
    check(case, "none", rng, chunk_size=5)


def test_spec_oracle(backend):
    """docs/zlpr.md, 'Worked examples': fused linear + ZLPR oracle (reduction 'sum')."""
    n, d, c = 3, 4, 7
    dtype = backend_dtype(backend)
    h = torch.tensor([[math.sin(i + 2 * k + 1) for k in range(d)] for i in range(n)], dtype=dtype)
    w = torch.tensor([[0.5 * math.cos(1.3 * j + 0.7 * k) for k in range(d)] for j in range(c)], dtype=dtype)
    b = torch.tensor([0.1 * j - 0.3 for j in range(c)], dtype=dtype)
    pos = torch.tensor([[2, 5], [0, -1], [-1, -1]])
    tol = 1e-9 if dtype == torch.float64 else 2e-6
    for chunk_size in (None, 2):
        loss, gh, gw, gb = run(fastnotes.fused_linear_multilabel_ce, h.to(DEVICE), w.to(DEVICE), b.to(DEVICE),
                               None, pos.to(DEVICE), "sum", None, chunk_size=chunk_size)
        assert abs(loss.item() - 7.8643627199) < tol * 8
        rows = fastnotes.fused_linear_multilabel_ce(h.to(DEVICE), w.to(DEVICE), pos_index=pos.to(DEVICE),
                                                    bias=b.to(DEVICE), reduction="none", chunk_size=chunk_size)
        assert torch.allclose(rows.cpu().double(), torch.tensor([2.9084053599, 2.9073780815, 2.0485792784],
                                                                dtype=torch.float64), atol=tol * 3, rtol=0)
        expected_dh = [[0.1745644689, 0.1673138504, 0.0813729138, -0.0428389757],
                       [-0.2862019263, -0.2635727823, -0.1169812403, 0.0846284069],
                       [0.005330682, -0.0143210172, -0.0272373182, -0.0273434829]]
        expected_dw0 = [-0.4135434564, 0.4103281811, 0.0720299074, -0.4702782172]
        expected_dw6 = [0.3881056589, -0.2328558613, -0.1943011988, 0.3945715197]
        expected_db = [-0.3867046368, 0.3412151887, -0.1580965529, 0.4624913374, 0.4637030314, 0.0362274212,
                       0.5643698897]
        for got, expected in ((gh, expected_dh), (gw[0], expected_dw0), (gw[6], expected_dw6), (gb, expected_db)):
            assert torch.allclose(got.cpu().double(), torch.tensor(expected, dtype=torch.float64), atol=max(tol, 1e-9),
                                  rtol=0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend_name, reduction, rng):
    hidden, weight, bias, targets, _ = make_case(5, 3, 6, rng, torch.float64, "soft")
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    with fastnotes.use_backend(backend_name):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fastnotes.fused_linear_multilabel_ce(h, w, targets, bias=b, reduction=reduction,
                                                                 chunk_size=2), args)


def test_second_backward_and_partial_grads(backend, rng):
    """retain_graph: a second backward gives the same gradients (the first one's buffers are handed
    out, so the op streams again); only the inputs that require grad get one."""
    hidden, weight, bias, _, pos = make_case(7, 5, 11, rng, backend_dtype(backend))
    h = hidden.to(DEVICE).requires_grad_()
    w = weight.to(DEVICE).requires_grad_()
    loss = fastnotes.fused_linear_multilabel_ce(h, w, pos_index=pos.to(DEVICE), bias=bias.to(DEVICE), chunk_size=3)
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    first = [g.clone() for g in first]
    second = torch.autograd.grad(loss, (h, w))
    for a, b in zip(first, second):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    w2 = weight.to(DEVICE).requires_grad_()
    loss = fastnotes.fused_linear_multilabel_ce(hidden.to(DEVICE), w2, pos_index=pos.to(DEVICE))
    (g,) = torch.autograd.grad(loss * 3, (w2,))
    with fastnotes.use_backend("reference"):
        w3 = weight.requires_grad_()
        (expected,) = torch.autograd.grad(fastnotes.fused_linear_multilabel_ce(hidden, w3, pos_index=pos) * 3, (w3,))
    assert torch.allclose(g.cpu(), expected, rtol=1e-5, atol=1e-6)


def test_no_grad_and_inputs_untouched(backend, rng):
    hidden, weight, bias, targets, _ = make_case(6, 5, 9, rng, backend_dtype(backend), "soft")
    h, w, b, t = (x.to(DEVICE) for x in (hidden, weight, bias, targets))
    before = [x.clone() for x in (h, w, b, t)]
    with torch.no_grad():
        loss = fastnotes.fused_linear_multilabel_ce(h.requires_grad_(), w, t, bias=b, chunk_size=4)
    expected = reference.fused_linear_multilabel_ce(hidden.double(), weight.double(), targets.double(), None,
                                                    bias.double(), "mean")
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1, expected.item())
    h.requires_grad_(False)
    for x, y in zip((h, w, b, t), before):
        assert torch.equal(x, y)


def test_empty_rows(backend):
    dtype = backend_dtype(backend)
    h = torch.zeros(0, 4, dtype=dtype, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, dtype=dtype, device=DEVICE, requires_grad=True)
    loss = fastnotes.fused_linear_multilabel_ce(h, w, pos_index=torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                                                reduction="sum")
    loss.backward()
    assert loss.item() == 0 and h.grad.shape == (0, 4) and (w.grad == 0).all()


def test_module(backend, rng):
    torch.manual_seed(0)
    head = fastnotes.FusedLinearMultilabelCE(6, 10, reduction="sum", chunk_size=2, dtype=backend_dtype(backend),
                                             device=DEVICE)
    assert "num_labels=10" in repr(head)
    hidden = torch.randn(4, 6, generator=rng, dtype=backend_dtype(backend)).to(DEVICE)
    pos = torch.tensor([[1, 3], [0, -1], [-1, -1], [9, 2]], device=DEVICE)
    loss = head(hidden, pos_index=pos)
    loss.backward()
    expected = reference.sparse_multilabel_ce(head.logits(hidden).detach().cpu().double(), pos.cpu(), "sum")
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1, expected.item())
    assert head.weight.grad is not None and head.bias.grad is not None


def test_half_precision_cpu(rng):
    """bfloat16/float16 inputs: the GEMMs run in that dtype, the epilogue and accumulators in float32."""
    for dtype in (torch.bfloat16, torch.float16):
        hidden, weight, bias, _, pos = make_case(10, 16, 30, rng, dtype, "sparse")
        with fastnotes.use_backend("numba"):
            loss, gh, gw, gb = run(fastnotes.fused_linear_multilabel_ce, hidden, weight, bias, None, pos, "mean", None,
                                   chunk_size=3)
        exact = run(composite, hidden.double(), weight.double(), bias.double(), None, pos, "mean", None)
        assert loss.dtype == dtype and gh.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype
        for got, e in zip((loss, gh, gw, gb), exact):
            assert torch.allclose(got.double(), e, rtol=3e-2, atol=3e-3 * max(1, e.abs().max().item()))


def test_training_run_matches_composite():
    """A 3-layer MLP on synthetic multi-label data: the fused head and the materialised composite
    give the same loss curve (and the loss does go down)."""
    gen = torch.Generator().manual_seed(3)
    n, d_in, d_hidden, c = 64, 12, 32, 200
    x = torch.randn(n, d_in, generator=gen)
    teacher = torch.randn(d_in, c, generator=gen)
    scores = x @ teacher
    pos = scores.topk(3, dim=-1).indices  # 3 positives per row

    def train(loss_fn):
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.GELU(), torch.nn.Linear(d_hidden, d_hidden),
                                   torch.nn.GELU())
        head = torch.nn.Linear(d_hidden, c)
        opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
        curve = []
        for _ in range(30):
            opt.zero_grad()
            loss = loss_fn(body(x), head.weight, head.bias)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return torch.tensor(curve)

    with fastnotes.use_backend("numba" if "numba" in CPU_BACKENDS else "reference"):
        fused = train(lambda h, w, b: fastnotes.fused_linear_multilabel_ce(h, w, pos_index=pos, bias=b, chunk_size=16))
        materialised = train(lambda h, w, b: fastnotes.sparse_multilabel_ce(F.linear(h, w, b), pos))
    assert fused[-1] < 0.7 * fused[0]
    assert torch.allclose(fused, materialised, rtol=1e-4, atol=1e-5), (fused - materialised).abs().max()


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["both", "neither", "weight_shape", "weight_dtype", "bias_shape", "targets_shape",
                                  "pos_range", "pos_negative", "pos_duplicate", "pos_shape", "pos_dtype", "chunk",
                                  "reduction", "targets_values", "device"])
def test_bad_arguments(case):
    hidden = torch.zeros(3, 4, dtype=torch.float64)  # float64: the kernel specialisations other tests compile
    weight = torch.zeros(5, 4, dtype=torch.float64)
    args = {"targets": None, "pos_index": torch.tensor([[0, 1], [2, -1], [-1, -1]])}
    error, match = ValueError, None
    if case == "both":
        args["targets"], match = torch.zeros(3, 5, dtype=torch.float64), "exactly one of targets"
    elif case == "neither":
        args["pos_index"], match = None, "exactly one of targets"
    elif case == "weight_shape":
        weight, match = torch.zeros(5, 3, dtype=torch.float64), "weight must be"
    elif case == "weight_dtype":
        weight, error, match = torch.zeros(5, 4), TypeError, "weight must have dtype"
    elif case == "bias_shape":
        args["bias"], match = torch.zeros(4, dtype=torch.float64), "bias must be"
    elif case == "targets_shape":
        args["pos_index"], args["targets"], match = None, torch.zeros(3, 4, dtype=torch.float64), \
            "targets must have shape"
    elif case == "pos_range":
        args["pos_index"][1, 1], match = 5, "must lie in"
    elif case == "pos_negative":
        args["pos_index"][1, 1], match = -2, "must lie in"
    elif case == "pos_duplicate":
        args["pos_index"][0, 1], match = 0, "twice"
    elif case == "pos_shape":
        args["pos_index"], match = torch.zeros(2, 2, dtype=torch.int64), "pos_index must have shape"
    elif case == "pos_dtype":
        args["pos_index"], error, match = torch.zeros(3, 2), TypeError, "pos_index must have dtype"
    elif case == "chunk":
        args["chunk_size"], match = 0, "chunk_size"
    elif case == "reduction":
        args["reduction"], match = "avg", "reduction"
    elif case == "targets_values":
        args["pos_index"], args["targets"], match = None, torch.full((3, 5), 1.5, dtype=torch.float64), \
            "targets must lie in"
    elif case == "device":
        weight, match = torch.zeros(5, 4, dtype=torch.float64, device="meta"), "weight is on meta"
    for backend in CPU_BACKENDS:
        with fastnotes.use_backend(backend), pytest.raises(error, match=match):
            fastnotes.fused_linear_multilabel_ce(hidden, weight, **args)


def test_targets_requiring_grad_raise(rng):
    hidden, weight, bias, targets, _ = make_case(4, 8, 10, rng, torch.float32, kind="soft")
    with pytest.raises(ValueError, match="no gradient for targets"):
        fastnotes.fused_linear_multilabel_ce(hidden, weight, targets.requires_grad_(), bias=bias)


def test_double_backward_raises(backend, rng):
    hidden, weight, bias, _, pos_index = make_case(6, 8, 10, rng, backend_dtype(backend))
    h = hidden.to(DEVICE).requires_grad_()
    loss = fastnotes.fused_linear_multilabel_ce(h, weight.to(DEVICE), pos_index=pos_index.to(DEVICE))
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    if backend == "reference":  # plain torch: differentiable twice
        torch.autograd.grad(g.square().sum() + h.sum(), h)
        return
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(g.square().sum() + h.sum(), h)


@pytest.mark.parametrize("kind", ["sparse", "hard"])
def test_autocast_cpu(kind, rng):
    """Under CPU autocast the op runs its GEMMs in bfloat16 as F.linear would, and the loss is float32
    as torch's losses give: the composite's values (bf16 logits, float32 loss), float32 gradients for
    float32 parameters."""
    hidden, weight, bias, targets, pos_index = make_case(12, 16, 40, rng, torch.float32, kind=kind)
    results = []
    for fn in (fastnotes.fused_linear_multilabel_ce, composite):
        h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, targets, pos_index=pos_index, bias=b, reduction="mean")
        loss.backward()
        results.append((loss, h.grad, w.grad, b.grad))
    (loss, *grads), (expected, *expected_grads) = results
    assert loss.dtype == torch.float32 and expected.dtype == torch.bfloat16  # the reference keeps the logits' dtype
    assert abs(loss.item() - expected.float().item()) <= 2e-2 * max(1.0, abs(expected.float().item()))
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max().item() <= 2e-2 * max(1.0, want.abs().max().item())
