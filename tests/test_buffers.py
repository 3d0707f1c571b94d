"""The CPU launchers reuse large gradient buffers only once torch has destroyed every owner of
the last one: never while anything (a tensor, a kept storage, a hook, another thread) holds it."""
import sys
import threading

import pytest
import torch
from conftest import available_backends
from zlpr_cases import oracle_with_grad

import fastnotes
from fastnotes import buffers
from fastnotes.kernels import _buffers

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


def _changed_if_reused(first_grad, second_call):
    """Keep only the storage of a gradient (as an UntypedStorage object), drop every tensor, run
    another call: the kept storage must not be handed out again."""
    storage = first_grad.untyped_storage()
    pointer, before = storage.data_ptr(), bytes(storage[:4096])
    del first_grad
    second = second_call()
    assert second.data_ptr() != pointer, "a storage still held by the caller was handed out again"
    assert bytes(storage[:4096]) == before


def test_kept_storage_is_not_reused(inputs):
    x, t = inputs
    _changed_if_reused(grad_of(x, t), lambda: grad_of(x, t))


def test_kept_storage_sparse_and_fused():
    _buffers.release()
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(SHAPE, generator=gen).requires_grad_()
    pos_index = torch.randint(0, SHAPE[1], (SHAPE[0], 3), generator=gen)
    pos_index[:, 1:] = -1

    def sparse_grad():
        with fastnotes.use_backend("numba"):
            return torch.autograd.grad(fastnotes.sparse_multilabel_ce(logits, pos_index), logits)[0]

    _changed_if_reused(sparse_grad(), sparse_grad)
    hidden = torch.randn(4096, 1024, generator=gen).requires_grad_()  # grad_hidden 16 MB
    weight = torch.randn(64, 1024, generator=gen).requires_grad_()
    targets = torch.rand(4096, 64, generator=gen) < 0.1

    def fused_grad():
        with fastnotes.use_backend("numba"):
            return torch.autograd.grad(fastnotes.fused_linear_multilabel_ce(hidden, weight, targets), hidden)[0]

    _changed_if_reused(fused_grad(), fused_grad)
    _buffers.release()


def test_storage_kept_by_a_hook(inputs):
    x, t = inputs
    kept = []
    x.register_hook(lambda g: kept.append(g.untyped_storage()))
    with fastnotes.use_backend("numba"):
        fastnotes.multilabel_ce(x, t).backward()
        x.grad = None
        snapshot = bytes(kept[0][:4096])
        fastnotes.multilabel_ce(x * 2, t).backward()
    assert kept[1].data_ptr() != kept[0].data_ptr()
    assert bytes(kept[0][:4096]) == snapshot


def test_threads_never_share_a_buffer(monkeypatch):
    """Four threads taking and filling buffers under one key, switching as often as the interpreter
    allows: each must see only its own writes (the old use-count check had no lock: 1 in ~20 000)."""
    monkeypatch.setattr(_buffers, "MIN_BYTES", 0)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    clashes = []

    def work(tag):
        for _ in range(30000):
            buffer = _buffers.empty("test.threads", (64,), torch.float32)
            buffer.fill_(tag)
            if not bool((buffer == tag).all()):
                clashes.append(tag)
            del buffer

    try:
        threads = [threading.Thread(target=work, args=(tag,)) for tag in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old_interval)
        _buffers.release()
    assert not clashes, f"{len(clashes)} buffers were handed to two threads at once"


def test_threads_end_to_end():
    """multilabel_ce backward from four threads at once gives each the single-threaded gradient."""
    _buffers.release()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 262144, generator=gen)
    t = torch.rand(8, 262144, generator=gen) < 0.01
    expected = grad_of(x.clone().requires_grad_(), t)
    wrong = []

    def work():
        for _ in range(15):
            got = grad_of(x.clone().requires_grad_(), t)
            if not torch.equal(got, expected):
                wrong.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _buffers.release()
    assert not wrong, f"{len(wrong)} of 60 gradients were wrong"


def test_poisoned_buffer_is_fully_overwritten(inputs):
    x, t = inputs
    del_me = grad_of(x, t)
    del del_me
    for arena, _ in _buffers._arenas.values():
        arena.fill(0xFF)  # NaN in every float dtype
    got = grad_of(x, t)
    _, exact = oracle_with_grad(x.detach(), t, None, torch.full((SHAPE[0],), 1.0 / SHAPE[0], dtype=torch.float64))
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), exact, atol=1e-7, rtol=1e-5)


def test_switched_off_by_environment(inputs, monkeypatch):
    monkeypatch.setenv("FASTNOTES_REUSE_BUFFERS", "0")
    x, t = inputs
    grad_of(x, t)
    assert not _buffers._arenas


def test_public_release(inputs):
    x, t = inputs
    grad_of(x, t)
    assert _buffers._arenas
    buffers.release()
    assert not _buffers._arenas
