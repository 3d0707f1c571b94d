"""The Triton kernels of global_pointer (kernels/triton/global_pointer.py) under TRITON_INTERPRET=1 on CPU
(or compiled on a GPU), in the cases that stress their own mechanics: 16 x 16 tiles so that small n
spans several row and column tiles, row tiles with more positives than one one-hot product takes
(INDEX_BLOCK), positives on tile edges and the diagonal, rows without positives, types sharing a q/k
head (Efficient GlobalPointer: the per-type partial states and bias-gradient slices updated tile
after tile), exact zeros on masked pairs, run-to-run determinism and decode across tiles. The op's
general cases on every backend are in tests/test_global_pointer.py."""
import math

import pytest
import torch
from conftest import DEVICE
from global_pointer_cases import check_against_oracle, make_case
from oracle import BF16, F16, F32, FLOORS

import fastnotes
from fastnotes import _dispatch
from fastnotes.global_pointer import global_pointer_scores

if _dispatch.availability("triton", DEVICE) is not None:
    pytest.skip(f"triton: {_dispatch.availability('triton', DEVICE)}", allow_module_level=True)

from fastnotes.kernels.triton import global_pointer as kernels  # noqa: E402
from fastnotes.reference import global_pointer as reference  # noqa: E402


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles under the interpreter (a GPU keeps its tuned tiles)."""
    monkeypatch.setattr(kernels, "INTERPRETER_TILE", 16)


def dense_spans(n, lengths, heads, rows, tril=True):
    """Every allowed (i, j) with i in `rows` as a positive: more than INDEX_BLOCK per row tile,
    on both edges of every column tile and on the diagonal."""
    spans = []
    for length in lengths:
        pairs = [(i, j) for i in rows if i < length for j in range(i if tril else 0, length)]
        spans.append([pairs] * heads)
    width = max(len(p) for sample in spans for p in sample)
    out = torch.full((len(lengths), heads, width, 2), -1, dtype=torch.int64)
    for b, sample in enumerate(spans):
        for t, pairs in enumerate(sample):
            if pairs:
                out[b, t, :len(pairs)] = torch.tensor(pairs)
    return out


CASES = {  # (batch, n, heads, d, make_case options, rows whose every pair is a positive)
    "tiles_tril": (2, 37, 2, 8, dict(lengths=[37, 22]), None),
    "tiles_no_tril_no_rope": (2, 35, 2, 6, dict(tril=False, rope=False, lengths=[35, 17]), None),
    "many_positives": (1, 40, 1, 8, {}, [3, 15, 16, 17]),
    "many_positives_no_tril": (2, 33, 2, 8, dict(tril=False, lengths=[33, 20]), [0, 16, 31]),
    "efficient": (2, 34, 4, 8, dict(efficient=True, lengths=[34, 19]), [16]),
    "efficient_diagonal": (2, 33, 3, 8, dict(efficient=True, diagonal=True, tril=False), None),
    "no_spans": (2, 33, 2, 8, dict(per_row=0, lengths=[33, 30]), None),
    "one_row_one_token": (1, 1, 2, 4, {}, None),
}


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_against_float64(small_tiles, case, rng):
    batch, n, heads, d, options, rows = CASES[case]
    tensors, kwargs = make_case(rng, batch, n, heads, d, **options)
    if rows is not None:
        lengths = options.get("lengths", [n] * batch)
        kwargs["spans"] = dense_spans(n, lengths, heads, rows, kwargs["tril"])
    check_against_oracle("triton", tensors, kwargs, F32, FLOORS[F32], rng)


def launcher_arguments(gen, batch, n, q_heads, heads, d, length):
    """The launchers' arguments as the public layer builds them, float32; tokens from `length` on
    in sample 0 are masked (-inf biases); one span per (b, t)."""
    q, k = (torch.randn(batch, n, q_heads, d, generator=gen) for _ in range(2))
    bias_start, bias_end = (torch.randn(batch, heads, n, generator=gen) for _ in range(2))
    bias_start[0, :, length:] = -math.inf
    bias_end[0, :, length:] = -math.inf
    pos = torch.tensor([[[2 * n + 5, -1]] * heads] * batch, dtype=torch.int64)
    cos, sin = reference.rope_tables(n, d, torch.float32, "cpu")
    return [t.to(DEVICE) for t in (q, k, cos, sin)], [t.to(DEVICE) for t in (bias_start, bias_end, pos)]


def test_masked_pairs_give_exact_zeros_and_runs_repeat_bit_for_bit(small_tiles, rng):
    """The gradients of masked tokens (only -inf pairs) are exactly 0, and two runs agree bit for
    bit (every output element has one writer, reductions in a fixed order)."""
    (q, k, cos, sin), (bias_start, bias_end, pos) = launcher_arguments(rng, 2, 37, 1, 3, 8, 23)
    args = (q, k, cos, sin, 0.35, bias_start, bias_end, pos, True)
    loss, stats = kernels.global_pointer_forward(*args)
    grad_loss = torch.rand(2, 3, generator=rng).to(DEVICE) + 0.5
    first = kernels.global_pointer_backward(*args, stats, grad_loss)
    again = kernels.global_pointer_backward(*args, *kernels.global_pointer_forward(*args)[1:], grad_loss)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    grad_q, grad_k, grad_start, grad_end = first
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in first)
    for grad in (grad_q[0, 23:], grad_k[0, 23:], grad_start[0, :, 23:], grad_end[0, :, 23:]):
        assert (grad == 0).all()
    assert (grad_q[0, :23].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("options", [dict(), dict(tril=False, efficient=True)],
                         ids=["default", "efficient_no_tril"])
def test_decode_across_tiles(small_tiles, options, rng):
    """The hits of every (type, row tile) land in their own slots across column tiles; the rows
    equal thresholding the dense scores (compared away from the threshold: float32 rounding)."""
    efficient = options.pop("efficient", False)
    tensors, kwargs = make_case(rng, 2, 35, 3, 8, efficient=efficient, lengths=[35, 18], **options)
    args = {name: t.to(device=DEVICE, dtype=F32) for name, t in tensors.items()}
    opts = dict(mask=kwargs["mask"].to(DEVICE), rope=kwargs["rope"], tril=kwargs["tril"],
                type_bias=args.get("type_bias"))
    scores = global_pointer_scores(args["q"], args["k"], **opts)
    with fastnotes.use_backend("triton"):
        got = fastnotes.global_pointer_decode(args["q"], args["k"], threshold=0.5, **opts)
    expected = (scores > 0.5).nonzero()
    assert len(expected) > 100
    near = ((scores - 0.5).abs() < 1e-4).nonzero()
    keep = lambda rows: rows[~(rows[:, None] == near[None]).all(-1).any(-1)]  # noqa: E731
    assert torch.equal(keep(got).cpu(), keep(expected).cpu())


def test_unsupported_head_sizes():
    assert kernels.unsupported() is None
    assert kernels.unsupported(torch.zeros(1, 2, 1, 128)) is None
    assert "up to 128" in kernels.unsupported(torch.zeros(1, 2, 1, 130))
    with pytest.raises(ValueError, match="up to 128"):
        kernels.global_pointer_decode(torch.zeros(1, 2, 1, 130), torch.zeros(1, 2, 1, 130), None, None, 1.0,
                                      torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), True, 0.0)


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", [(2, 300, 4, 64, {}), (2, 257, 6, 128, dict(efficient=True)),
                                   (3, 200, 3, 32, dict(tril=False, lengths=[200, 150, 9]))], ids=str)
def test_gpu_tiles_against_float64(dtype, shape, rng):
    """The tuned GPU tiles (3xTF32 for float32, bf16/fp16 products otherwise) against float64."""
    batch, n, heads, d, options = shape
    if dtype == F32 and d > kernels.FP32_MAX_HEAD_DIM:
        pytest.skip("float32 head sizes over 64 run on the reference")
    tensors, kwargs = make_case(rng, batch, n, heads, d, scale=1.0, **options)
    check_against_oracle("triton", tensors, kwargs, dtype, FLOORS[dtype], rng)
