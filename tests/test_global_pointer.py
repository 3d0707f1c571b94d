"""global_pointer_loss / global_pointer_decode / nn.GlobalPointer against the float64 dense
reference and the bert4keras formulation."""
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE
from global_pointer_cases import BACKENDS, check_against_oracle, make_case, random_spans
from oracle import BF16, F16, F32, F64, FLOORS, PROPERTY_FLOORS

import fastnotes
from fastnotes import _registry
from fastnotes.global_pointer import global_pointer_scores
from fastnotes.reference import global_pointer as reference

FUSED = [b for b in BACKENDS if b != "reference"]


def dtypes_of(backend):
    return [F32] if backend == "triton" else [F64, F32]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# (batch, n, heads, d, options): odd n, padding, one and many types, several tiles, tril/rope off
CONFIGS = {
    "odd_n": (2, 37, 3, 8, {}),
    "padding": (3, 45, 2, 8, dict(lengths=[45, 30, 1])),
    "one_type": (2, 70, 1, 16, dict(lengths=[70, 52])),
    "many_types": (2, 20, 40, 4, dict(lengths=[20, 13])),
    "tiles": (1, 300, 2, 16, dict(lengths=[261], per_row=8)),
    "no_tril": (2, 41, 3, 8, dict(tril=False, lengths=[41, 33])),
    "no_rope": (2, 41, 3, 6, dict(rope=False, lengths=[41, 33])),
    "no_spans": (2, 33, 3, 8, dict(per_row=0)),
    "diagonal_spans": (2, 33, 3, 8, dict(diagonal=True)),
    "efficient": (2, 47, 5, 8, dict(efficient=True, lengths=[47, 21])),
    "per_type_with_bias": (2, 33, 3, 8, dict(type_bias=True, lengths=[33, 30])),
    "efficient_tiles_no_tril": (2, 290, 3, 8, dict(efficient=True, tril=False, lengths=[290, 100])),
    "large_scores": (2, 40, 2, 8, dict(scale=6.0)),  # terms beyond e^88: the exact redo of a row
}


@pytest.mark.parametrize("config", CONFIGS)
def test_against_reference(backend, config, rng):
    batch, n, heads, d, options = CONFIGS[config]
    tensors, kwargs = make_case(rng, batch, n, heads, d, **options)
    for dtype in dtypes_of(backend):
        floor = PROPERTY_FLOORS[dtype] if config == "large_scores" else FLOORS[dtype]
        check_against_oracle(backend, tensors, kwargs, dtype, floor, rng)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("efficient", [False, True])
def test_half_precision(backend, dtype, efficient, rng):
    """float16/bfloat16 inputs compute in float32; the loss and gradients come back in the input
    dtype, within that dtype's rounding of the float64 oracle (the tolerance rule)."""
    if backend == "triton":
        pytest.skip("the Triton interpreter runs float32 only")
    tensors, kwargs = make_case(rng, 2, 29, 3, 8, efficient=efficient, lengths=[29, 17], scale=1.0)
    check_against_oracle(backend, tensors, kwargs, dtype, FLOORS[dtype], rng)


def test_empty_rows_are_zero_and_finite(backend):
    """A sample whose tokens are all masked and rows without spans: log(1 + 0) terms, zero gradient."""
    gen = torch.Generator().manual_seed(3)
    tensors, kwargs = make_case(gen, 2, 9, 2, 4, lengths=[9, 1], per_row=0)
    kwargs["mask"][1] = False
    with fastnotes.use_backend(backend):
        q, k = (tensors[n].to(DEVICE, dtypes_of(backend)[0]).requires_grad_() for n in ("q", "k"))
        loss = fastnotes.global_pointer_loss(q, k, kwargs["spans"].to(DEVICE), mask=kwargs["mask"].to(DEVICE),
                                             reduction="none")
        loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss[1] == 0).all() and (loss[0] > 0).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all()


def test_reductions(backend, rng):
    tensors, kwargs = make_case(rng, 2, 15, 3, 4)
    tensors = {name: t.to(dtypes_of(backend)[0]) for name, t in tensors.items()}
    with fastnotes.use_backend(backend):
        rows, mean, total = (fastnotes.global_pointer_loss(tensors["q"], tensors["k"], kwargs["spans"], reduction=r)
                             for r in ("none", "mean", "sum"))
    assert rows.shape == (2, 3)
    torch.testing.assert_close(mean, rows.mean())
    torch.testing.assert_close(total, rows.sum())
    with pytest.raises(ValueError, match="reduction"):
        fastnotes.global_pointer_loss(tensors["q"], tensors["k"], kwargs["spans"], reduction="max")


# ---- bert4keras ----------------------------------------------------------------------------------


def bert4keras_sinusoidal(n, d, dtype):
    """bert4keras.backend.sinusoidal_embeddings of positions 0..n-1: [sin, cos] interleaved per pair."""
    theta = torch.pow(torch.tensor(10000.0, dtype=dtype), -2 * torch.arange(d // 2, dtype=dtype) / d)
    angles = torch.arange(n, dtype=dtype)[:, None] * theta
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def bert4keras_rope(pos, x):
    """bert4keras.backend.apply_rotary_position_embeddings for x [B, n, ..., d], pos [n, d]."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (x.shape[-1],)
    cos = pos[..., 1::2].repeat_interleave(2, dim=-1).reshape(shape)
    sin = pos[..., ::2].repeat_interleave(2, dim=-1).reshape(shape)
    x2 = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape(x.shape)
    return x * cos + x2 * sin


def bert4keras_masks(logits, mask, tril):
    """The ports' masking: padding and the strict lower triangle pushed down by 1e12."""
    if mask is not None:
        m = mask.to(logits.dtype)
        logits = logits - (1 - m[:, None, :, None] * m[:, None, None, :]) * 1e12
    if tril:
        logits = logits - torch.tril(torch.ones_like(logits), diagonal=-1) * 1e12
    return logits


def multilabel_categorical_crossentropy(y_true, y_pred):
    """bert4keras.backend.multilabel_categorical_crossentropy (hard labels)."""
    y_neg = torch.where(y_pred != -math.inf, y_pred, -math.inf) + torch.log(1 - y_true)
    y_pos = torch.where(y_pred != -math.inf, -y_pred, -math.inf) + torch.log(y_true)
    zeros = torch.zeros_like(y_pred[..., :1])
    return torch.logsumexp(torch.cat([y_neg, zeros], -1), -1) + torch.logsumexp(torch.cat([y_pos, zeros], -1), -1)


def bert4keras_loss(gp, hidden, mask, spans):
    """bert4keras's GlobalPointer / EfficientGlobalPointer layer (with the module's weights) and its
    loss: MCCE over the flattened n^2 scores of each (sample, type), averaged over the B * H rows."""
    batch, n = hidden.shape[:2]
    d, heads = gp.head_size, gp.num_types
    pos = bert4keras_sinusoidal(n, d, hidden.dtype)
    x = gp.dense(hidden)
    if gp.efficient:
        qw, kw = bert4keras_rope(pos, x[..., ::2]), bert4keras_rope(pos, x[..., 1::2])
        logits = torch.einsum("bmd,bnd->bmn", qw, kw) / d ** 0.5
        bias = gp.type_dense(x).transpose(1, 2) / 2
        logits = logits[:, None] + bias[:, ::2, None] + bias[:, 1::2, :, None]
    else:
        x = torch.stack(torch.split(x, 2 * d, dim=-1), dim=-2)
        qw, kw = bert4keras_rope(pos, x[..., :d]), bert4keras_rope(pos, x[..., d:])
        logits = torch.einsum("bmhd,bnhd->bhmn", qw, kw) / d ** 0.5
    logits = bert4keras_masks(logits, mask, gp.tril)
    y_true = reference.span_targets(spans, n).to(hidden.dtype)
    return multilabel_categorical_crossentropy(y_true, logits.reshape(batch, heads, n * n)).mean()


@pytest.mark.parametrize("efficient", [False, True])
def test_agrees_with_bert4keras(backend, efficient, rng):
    """The module's fused loss equals bert4keras's layer + MCCE on the same weights (float64):
    value and the gradients of every parameter and of the hidden states."""
    if backend == "triton":
        pytest.skip("float64 comparison; the Triton kernel is checked against the reference")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    gp = fastnotes.nn.GlobalPointer(24, 4, 8, efficient=efficient).double()
    hidden = torch.randn(3, 31, 24, generator=rng, dtype=F64, requires_grad=True)
    mask = torch.arange(31)[None, :] < torch.tensor([31, 20, 9])[:, None]
    spans = random_spans(rng, [31, 20, 9], 4, 5)
    expected = bert4keras_loss(gp, hidden, mask, spans)
    expected_grads = torch.autograd.grad(expected, [hidden, *gp.parameters()])
    with fastnotes.use_backend(backend):
        loss = gp.loss(hidden, spans, mask)
    grads = torch.autograd.grad(loss, [hidden, *gp.parameters()])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ---- decode and the module ------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, dict(tril=False), dict(rope=False), dict(efficient=True)],
                         ids=["default", "no_tril", "no_rope", "efficient"])
@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.5])
def test_decode_equals_thresholded_scores(backend, options, threshold, rng):
    efficient = options.pop("efficient", False)
    tensors, kwargs = make_case(rng, 3, 57, 4, 8, efficient=efficient, lengths=[57, 40, 3], **options)
    dtype = F32 if backend == "triton" else F64
    args = {name: t.to(device=DEVICE, dtype=dtype) for name, t in tensors.items()}
    opts = dict(mask=kwargs["mask"].to(DEVICE), rope=kwargs["rope"], tril=kwargs["tril"],
                type_bias=args.get("type_bias"))
    scores = global_pointer_scores(args["q"], args["k"], **opts)
    expected = (scores > threshold).nonzero()
    with fastnotes.use_backend(backend):
        got = fastnotes.global_pointer_decode(args["q"], args["k"], threshold=threshold, **opts)
    assert got.dtype == torch.int64 and got.shape[1] == 4
    if dtype == F32:  # rounding may move a score across the threshold: compare away from it
        near = ((scores - threshold).abs() < 1e-4).nonzero()
        keep = lambda rows: rows[~(rows[:, None] == near[None]).all(-1).any(-1)]  # noqa: E731
        got, expected = keep(got), keep(expected)
    assert torch.equal(got.cpu(), expected.cpu())


def test_module_forward_loss_decode_scores(rng):
    torch.manual_seed(0)
    hidden = torch.randn(2, 11, 16, generator=rng)
    mask = torch.tensor([[True] * 11, [True] * 7 + [False] * 4])
    spans = random_spans(rng, [11, 7], 3, 3)
    for efficient in (False, True):
        gp = fastnotes.nn.GlobalPointer(16, 3, 8, efficient=efficient)
        q, k, type_bias = gp(hidden)
        assert q.shape == ((2, 11, 8) if efficient else (2, 11, 3, 8)) and k.shape == q.shape
        assert (type_bias is None) != efficient
        torch.testing.assert_close(gp.loss(hidden, spans, mask),
                                   fastnotes.global_pointer_loss(q, k, spans, mask=mask, type_bias=type_bias))
        scores = gp.scores(hidden, mask)
        assert scores.shape == (2, 3, 11, 11)
        assert torch.equal(gp.decode(hidden, mask, threshold=0.1), (scores > 0.1).nonzero())
    with pytest.raises(ValueError, match="head_size"):
        fastnotes.nn.GlobalPointer(16, 3, 7)


# ---- bad input -----------------------------------------------------------------------------------


def _spans_with(pair, where=(0, 1, 0)):
    spans = torch.full((2, 3, 2, 2), -1, dtype=torch.int64)
    spans[where] = torch.tensor(pair)
    return spans


BAD_SPANS = {
    "end_before_start": (_spans_with((5, 3)), "ends before it starts"),
    "beyond_n": (_spans_with((2, 12)), r"\[0, n=12\)"),
    "negative": (_spans_with((-2, 3)), r"\[0, n=12\)"),
    "half_padding": (_spans_with((-1, 3)), "padding"),
    "on_padded_token": (_spans_with((2, 10), (1, 0, 0)), "mask removes"),
    "duplicate": (torch.tensor([[[[1, 2], [1, 2]]] * 3] * 2), "twice"),
    "shape": (torch.zeros(2, 3, 2, dtype=torch.int64), "must be integer"),
    "dtype": (torch.zeros(2, 3, 1, 2), "spans must have dtype"),
}


@pytest.mark.parametrize("case", BAD_SPANS)
def test_bad_spans_raise_before_any_kernel(case, monkeypatch):
    def kernel_called(*args, **kwargs):
        raise AssertionError("a kernel ran on bad spans")

    for backend in FUSED:
        monkeypatch.setattr(_registry.GLOBAL_POINTER.kernels(backend), "global_pointer_forward", kernel_called)
    spans, message = BAD_SPANS[case]
    q = torch.randn(2, 12, 3, 4)
    mask = torch.tensor([[True] * 12, [True] * 9 + [False] * 3])
    with pytest.raises((ValueError, TypeError), match=message) as info:
        fastnotes.global_pointer_loss(q, q, spans, mask=mask)
    assert "spans" in str(info.value)


def test_bad_arguments_raise():
    q = torch.randn(2, 12, 3, 4)
    spans = torch.full((2, 3, 1, 2), -1)
    cases = [
        (dict(q=q, k=q[..., :2]), "k must have the shape"),
        (dict(q=q, k=q.double()), "share a dtype"),
        (dict(q=q[..., :3], k=q[..., :3]), "even head_size"),
        (dict(q=q[:, :, 0], k=q[:, :, 0]), "needs type_bias"),
        (dict(q=q, k=q, type_bias=torch.randn(2, 12, 2, 2)), "type_bias must be"),
        (dict(q=q, k=q, mask=torch.ones(2, 11, dtype=torch.bool)), "mask must be"),
        (dict(q=q, k=q, mask=torch.ones(2, 12)), "mask must have dtype"),
        (dict(q=q, k=q, tril=1), "tril must be a bool"),
        (dict(q=q.int(), k=q.int()), "q must have dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            fastnotes.global_pointer_loss(kwargs.pop("q"), kwargs.pop("k"), spans, **kwargs)
    with pytest.raises(ValueError, match="threshold"):
        fastnotes.global_pointer_decode(q, q, threshold=math.nan)
    with pytest.raises(TypeError, match="threshold must be a real number"):
        fastnotes.global_pointer_decode(q, q, threshold="0.5")
    with pytest.raises(TypeError, match="spans"):  # unsigned spans cannot hold the -1 padding
        fastnotes.global_pointer_loss(q, q, spans.to(torch.uint8))
    numpy_threshold = fastnotes.global_pointer_decode(q, q, threshold=np.float32(0.25))
    assert torch.equal(numpy_threshold, fastnotes.global_pointer_decode(q, q, threshold=0.25))


# ---- autograd mechanics --------------------------------------------------------------------------


def test_double_backward(backend):
    """The fused backward is a kernel: differentiating its gradient again raises (never a silent
    constant). The reference path is plain torch: gradgradcheck."""
    gen = torch.Generator().manual_seed(5)
    tensors, kwargs = make_case(gen, 1, 6, 2, 4, efficient=True, per_row=2)
    dtype = F32 if backend == "triton" else F64
    leaves = [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in tensors.values()]
    spans, mask = kwargs["spans"].to(DEVICE), None

    def fn(q, k, type_bias):
        return fastnotes.global_pointer_loss(q, k, spans, mask=mask, type_bias=type_bias)

    with fastnotes.use_backend(backend):
        if backend == "reference":
            assert torch.autograd.gradgradcheck(fn, leaves)
            return
        for i in range(3):
            g = torch.autograd.grad(fn(*leaves), leaves[i], create_graph=True)[0]
            with pytest.raises(RuntimeError, match="differentiated again"):
                g.square().sum().backward()


@pytest.mark.parametrize("efficient", [False, True])
def test_autocast_bfloat16(efficient, rng):
    """Projections under CPU autocast are bfloat16: the loss comes out float32 (as torch's losses)
    and matches the float64 oracle on the same bfloat16 projections to float32 accuracy; the
    parameter gradients keep float32."""
    gp = fastnotes.nn.GlobalPointer(16, 3, 8, efficient=efficient)
    hidden = torch.randn(2, 19, 16, generator=rng)
    mask = torch.arange(19)[None, :] < torch.tensor([19, 12])[:, None]
    spans = random_spans(rng, [19, 12], 3, 3)
    for backend in [b for b in BACKENDS if b != "triton"]:
        with fastnotes.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, type_bias = gp(hidden)
            loss = fastnotes.global_pointer_loss(q, k, spans, mask=mask, type_bias=type_bias)
        grads = torch.autograd.grad(loss, list(gp.parameters()))
        assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32, backend
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), backend
        expected = reference.global_pointer_loss(q.double(), k.double(), spans, mask,
                                                 type_bias=None if type_bias is None else type_bias.double())
        assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, expected.item()), backend
