"""The CPU launchers reuse large gradient buffers only when nothing else refers to them."""
import pytest
import torch
from conftest import available_backends
from helpers import oracle_with_grad

import fastnotes
from fastnotes.kernels.numba import _buffers

pytestmark = pytest.mark.skipif("numba" not in available_backends("cpu"), reason="numba not installed")
SHAPE = (64, 40000)  # 10 MB of float32: above the reuse threshold


def grad_of(x, t):
    with fastnotes.use_backend("numba"):
        (g,) = torch.autograd.grad(fastnotes.multilabel_ce(x, t), x)
    return g


@pytest.fixture
def inputs():
    _buffers.release()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=gen).requires_grad_()
    t = torch.rand(SHAPE, generator=gen) < 0.01
    yield x, t
    _buffers.release()


def test_reused_after_release_by_caller(inputs):
    x, t = inputs
    first = grad_of(x, t)
    pointer = first.data_ptr()
    del first
    assert grad_of(x, t).data_ptr() == pointer


def test_not_reused_while_held(inputs):
    x, t = inputs
    first = grad_of(x, t)
    kept = first.clone()
    second = grad_of(x, t)
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept), "a gradient the caller still holds was overwritten"


def test_not_reused_while_saved_as_leaf_grad(inputs):
    x, t = inputs
    with fastnotes.use_backend("numba"):
        fastnotes.multilabel_ce(x, t).backward()
        saved = x.grad.clone()
        fastnotes.multilabel_ce(x, t).backward()
    assert torch.allclose(x.grad, 2 * saved)


def test_poisoned_buffer_is_fully_overwritten(inputs):
    x, t = inputs
    del_me = grad_of(x, t)
    del del_me
    for base in _buffers._held.values():
        base.fill_(float("nan"))
    got = grad_of(x, t)
    _, exact = oracle_with_grad(x.detach(), t, None, torch.full((SHAPE[0],), 1.0 / SHAPE[0], dtype=torch.float64))
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), exact, atol=1e-7, rtol=1e-5)


def test_switched_off_by_environment(inputs, monkeypatch):
    monkeypatch.setenv("FASTNOTES_REUSE_BUFFERS", "0")
    x, t = inputs
    grad_of(x, t)
    assert not _buffers._held
