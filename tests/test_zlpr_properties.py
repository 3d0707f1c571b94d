"""Property tests (hypothesis) for the ZLPR family (multilabel_ce, sparse_multilabel_ce,
fused_linear_multilabel_ce, nm_class_ce) against the float64 reference: shapes (C across the CPU
kernel's 1024-column chunks), layouts, dtypes, masks, extreme and infinite logits, soft targets on
the boundaries; bad input raises an error naming the argument. Small budgets: the Triton interpreter
runs only tiny float32 cases."""
import math

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import given
from hypothesis import strategies as st
from oracle import PROPERTY_FLOORS, assert_close_to_oracle, property_settings

import fastnotes
from fastnotes import reference

BACKENDS = available_backends()
SETTINGS = property_settings(25)
# logit values that take the kernels' special paths: overflow (|s| ~ 88 and beyond), -inf
SPECIAL_LOGITS = [0.0, 88.5, -88.5, 200.0, -200.0, 1e4, -1e4, float("-inf")]


def dtypes_for(backend):
    return [torch.float32] if backend == "triton" else [torch.float64, torch.float32]


@st.composite
def zlpr_case(draw, backend):
    """(logits, targets, mask, upstream) with the logits in a random layout."""
    dtype = draw(st.sampled_from(dtypes_for(backend)))
    lead = tuple(draw(st.lists(st.integers(0 if backend != "triton" else 1, 4), min_size=0, max_size=2)))
    n_classes = draw(st.sampled_from([1, 7, 64, 1023, 1025]) if backend == "triton"
                     else st.sampled_from([1, 31, 1024, 2100, 2100]))
    shape = lead + (n_classes,)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if logits.numel():
        rows = logits.view(-1, n_classes)
        for _ in range(draw(st.integers(0, 6))):
            # in the first 1024-column chunk: later chunks then run after the CPU kernel's overflow path
            column = int(torch.randint(min(n_classes, 1024) if draw(st.booleans()) else n_classes, (1,), generator=gen))
            rows[int(torch.randint(rows.shape[0], (1,), generator=gen)), column] = draw(st.sampled_from(SPECIAL_LOGITS))
    kind = draw(st.sampled_from(["bool", "float", "soft"]))
    hard = torch.rand(shape, generator=gen, dtype=torch.float64) < draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    if kind == "bool":
        targets = hard
    elif kind == "float":
        targets = hard.to(dtype)
    else:
        targets = torch.where(torch.rand(shape, generator=gen) < 0.3, hard.double(),
                              torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
    mask = None
    if draw(st.booleans()):
        mask_shape = draw(st.sampled_from(["full", "shared"]))
        mask = torch.rand(shape if mask_shape == "full" else (n_classes,), generator=gen) < 0.7
    layout = draw(st.sampled_from(["contiguous", "strided"]))
    logits = logits.to(dtype)
    if layout == "strided":
        wide = torch.zeros(shape[:-1] + (2 * n_classes,), dtype=dtype)
        wide[..., ::2] = logits
        logits = wide[..., ::2]
    upstream = torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5
    return logits, targets, mask, upstream


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_multilabel_ce_properties(backend_name):
    @SETTINGS
    @given(zlpr_case(backend_name))
    def check(case):
        logits, targets, mask, upstream = case
        x = logits.detach().clone().to(DEVICE).requires_grad_()
        with fastnotes.use_backend(backend_name):
            loss = fastnotes.multilabel_ce(x, targets.to(DEVICE), mask=None if mask is None else mask.to(DEVICE),
                                           reduction="none")
        loss.backward(upstream.to(DEVICE, loss.dtype))
        assert loss.dtype == logits.dtype and loss.shape == logits.shape[:-1]
        results = []
        for dtype in (torch.float64, logits.dtype):  # exact, then the same-dtype composite
            xr = logits.detach().to(dtype).requires_grad_()
            t = targets if targets.dtype == torch.bool else targets.to(dtype)
            ref = reference.multilabel_ce(xr, t, mask, "none")
            ref.backward(upstream.to(dtype))
            results.append((ref, xr.grad))
        (exact, exact_grad), (same, same_grad) = results
        for name, got, ex, comp in (("loss", loss, exact, same), ("grad", x.grad, exact_grad, same_grad)):
            assert_close_to_oracle(got, ex, comp, PROPERTY_FLOORS[logits.dtype], name, entrywise=True,
                                   same_nonfinite=True)

    check()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sparse_and_fused_agree_with_the_dense_reference(backend_name):
    dtypes = dtypes_for(backend_name)

    @SETTINGS
    @given(rows=st.integers(1, 6), n_classes=st.sampled_from([3, 40, 1100]), k=st.integers(0, 3),
           dim=st.integers(1, 9), dtype=st.sampled_from(dtypes), chunk=st.sampled_from([None, 1, 4]),
           with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def check(rows, n_classes, k, dim, dtype, chunk, with_bias, seed):
        gen = torch.Generator().manual_seed(seed)
        k = min(k, n_classes)
        pos = torch.stack([torch.randperm(n_classes, generator=gen)[:k] for _ in range(rows)])
        if k:
            pos[::2, -1] = -1
        hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
        weight = torch.randn(n_classes, dim, generator=gen, dtype=torch.float64) * 3
        bias = torch.randn(n_classes, generator=gen, dtype=torch.float64) if with_bias else None
        exact_logits = torch.nn.functional.linear(hidden, weight, bias)
        exact = reference.sparse_multilabel_ce(exact_logits, pos, "none")
        with fastnotes.use_backend(backend_name):
            sparse = fastnotes.sparse_multilabel_ce(exact_logits.to(dtype).to(DEVICE), pos.to(DEVICE), reduction="none")
            fused = fastnotes.fused_linear_multilabel_ce(
                hidden.to(dtype).to(DEVICE), weight.to(dtype).to(DEVICE), pos_index=pos.to(DEVICE),
                bias=None if bias is None else bias.to(dtype).to(DEVICE), reduction="none", chunk_size=chunk)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for name, got in (("sparse", sparse), ("fused", fused)):
            assert got.dtype == dtype and torch.isfinite(got).all(), name
            assert torch.allclose(got.cpu().double(), exact, rtol=tol, atol=tol), name

    check()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_nm_class_properties(backend_name):
    dtypes = dtypes_for(backend_name)

    @SETTINGS
    @given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.integers(1, 6), m=st.integers(2, 9),
           dtype=st.sampled_from(dtypes), scale=st.sampled_from([0.1, 3.0, 40.0]), soft=st.booleans(),
           seed=st.integers(0, 2**31 - 1))
    def check(lead, n, m, dtype, scale, soft, seed):
        gen = torch.Generator().manual_seed(seed)
        shape = tuple(lead) + (n, m)
        logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        if soft:
            targets = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 3, -1).to(dtype)
        else:
            targets = torch.randint(-1, m, shape[:-1], generator=gen)
        x = logits.clone().to(DEVICE).requires_grad_()
        with fastnotes.use_backend(backend_name):
            loss = fastnotes.nm_class_ce(x, targets.to(DEVICE), reduction="sum")
        loss.backward()
        xr = logits.double().requires_grad_()
        exact = reference.nm_class_ce(xr, targets if not soft else targets.double(), "sum")
        exact.backward()
        rel = 1e-9 if dtype == torch.float64 else 2e-4
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert abs(loss.item() - exact.item()) <= rel * max(1.0, abs(exact.item()))
        assert (x.grad.cpu().double() - xr.grad).abs().max() <= rel * max(1.0, xr.grad.abs().max().item()) * math.sqrt(n)

    check()


BAD_CALLS = {
    "logits": lambda: fastnotes.multilabel_ce([[1.0]], torch.ones(1, 1)),
    "targets": lambda: fastnotes.multilabel_ce(torch.zeros(2, 3), torch.zeros(2, 4)),
    "mask": lambda: fastnotes.multilabel_ce(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2, 3)),
    "reduction": lambda: fastnotes.multilabel_ce(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg"),
    "pos_index": lambda: fastnotes.sparse_multilabel_ce(torch.zeros(2, 3), torch.tensor([[0], [3]])),
    "weight": lambda: fastnotes.fused_linear_multilabel_ce(torch.zeros(2, 3), torch.zeros(4, 2),
                                                            pos_index=torch.zeros(2, 1, dtype=torch.long)),
    "chunk_size": lambda: fastnotes.fused_linear_multilabel_ce(torch.zeros(2, 3), torch.zeros(4, 3),
                                                                pos_index=torch.zeros(2, 1, dtype=torch.long),
                                                                chunk_size=0),
}


@pytest.mark.parametrize("argument", sorted(BAD_CALLS))
def test_bad_input_names_the_argument(argument):
    with pytest.raises((TypeError, ValueError), match=argument):
        BAD_CALLS[argument]()
