"""Every op called from four Python threads at once gives what it gives called alone (users run
ops from threads: data pipelines, serving, DataLoader workers), and a DataLoader worker forked after
the parent ran an op still computes it."""
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch
from conftest import available_backends

import fastnotes
from fastnotes import diffusion, hubness, lst

THREADS, ROUNDS = 4, 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def zlpr_dense():
    g = _gen(1)
    x = (torch.randn(16, 3000, generator=g) * 3).requires_grad_()
    loss = fastnotes.multilabel_ce(x, torch.rand(16, 3000, generator=g) < 0.05, reduction="sum")
    return (loss, *torch.autograd.grad(loss, x))


def zlpr_sparse():
    g = _gen(2)
    x = (torch.randn(16, 3000, generator=g) * 3).requires_grad_()
    loss = fastnotes.sparse_multilabel_ce(x, torch.randint(0, 3000, (16, 1), generator=g))
    return (loss, *torch.autograd.grad(loss, x))


def zlpr_fused_linear():
    g = _gen(3)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, requires_grad=True)
    loss = fastnotes.fused_linear_multilabel_ce(hidden, weight, pos_index=torch.randint(0, 500, (64, 1), generator=g),
                                                chunk_size=16)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


def nm_class():
    g = _gen(4)
    x = torch.randn(8, 6, 5, generator=g, requires_grad=True)
    loss = fastnotes.nm_class_ce(x, torch.randint(0, 5, (8, 6), generator=g))
    return (loss, *torch.autograd.grad(loss, x))


def exact():
    g = _gen(5)
    x = torch.randn(32, 10, generator=g, requires_grad=True)
    loss = fastnotes.exact_loss(x, torch.randint(0, 10, (32,), generator=g), sigma=0.7)
    return (loss, *torch.autograd.grad(loss, x))


def attention():
    g = _gen(6)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    bias = fastnotes.T5RelativeBias(2)
    with torch.no_grad():
        bias.table.copy_(torch.randn(bias.table.shape, generator=g))
    out = fastnotes.relpos_attention(q, k, v, causal=True, rel_bias=bias.table, rel_buckets=bias.rel_buckets)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v, bias.table)))


def ladder():
    g = _gen(7)
    s = torch.randn(64, 16, generator=g, requires_grad=True)
    h = torch.randn(64, 48, generator=g)
    weight = torch.randn(16, 48, generator=g, requires_grad=True)
    alpha = torch.zeros(1, requires_grad=True)
    out = lst.ladder_merge(s, h, weight, None, alpha)
    return (out, *torch.autograd.grad(out.square().sum(), (s, weight, alpha)))


def sampler():
    g = _gen(8)
    x = torch.randn(4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 3, 8, 8, generator=g)
    return (diffusion.sampler_step(x, eps, 500, 480, diffusion.NoiseSchedule.linear(1000), method="ddpm",
                                   generator=_gen(9)),)


def knn():
    x = torch.randn(300, 8, generator=_gen(10))
    distances, indices = hubness.knn(x, 5)
    return distances, indices, hubness.k_occurrence(x, 5)


def amos():
    g = _gen(11)
    weight = torch.nn.Parameter(torch.randn(32, 16, generator=g))
    opt = fastnotes.Amos([weight], lr=0.01)
    for _ in range(3):
        weight.grad = torch.randn(32, 16, generator=g)
        opt.step()
    return (weight.detach(),)


def global_pointer():
    g = _gen(12)
    q, k = (torch.randn(2, 300, 3, 16, generator=g, requires_grad=True) for _ in range(2))
    spans = torch.tensor([[[[0, 4], [7, 7]]] * 3] * 2)
    mask = torch.arange(300)[None, :] < torch.tensor([[300], [211]])
    loss = fastnotes.global_pointer_loss(q, k, spans, mask=mask)
    return (loss, *torch.autograd.grad(loss, (q, k)), fastnotes.global_pointer_decode(q, k, mask=mask, threshold=2.0))


OPS = [zlpr_dense, zlpr_sparse, zlpr_fused_linear, nm_class, exact, attention, ladder, sampler, knn, amos,
       global_pointer]


@pytest.mark.skipif("numba" not in available_backends("cpu"), reason="numba not installed")
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_four_threads_agree_with_one(op):
    expected = op()
    results, errors = [], []

    def work():
        try:
            for _ in range(ROUNDS):
                results.append(op())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len(results) == THREADS * ROUNDS
    for got in results:
        for a, b in zip(got, expected):
            # the same call on the same inputs; only BLAS blocking could move the last bit
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _LossPerItem(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = _gen(i)
        return fastnotes.multilabel_ce(torch.randn(8, 700, generator=g), torch.rand(8, 700, generator=g) < 0.1)


@pytest.mark.skipif("numba" not in available_backends("cpu"), reason="numba not installed")
@pytest.mark.filterwarnings("ignore:multilabel_ce. no fused kernel")
def test_forked_dataloader_worker_after_the_parent_ran_an_op():
    """GNU OpenMP kills a forked child that enters a parallel region its parent started; such a
    worker runs the reference instead (with a warning), and gives the same numbers."""
    dataset = _LossPerItem()
    expected = [dataset[i] for i in range(len(dataset))]  # starts numba's OpenMP pool here
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork",
                                         timeout=120)
    got = list(loader)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("numba" not in available_backends("cpu"), reason="numba not installed")
@pytest.mark.parametrize("op", ["zlpr_dense", "exact", "amos", "global_pointer", "attention"])
def test_first_numba_call_keeps_torch_thread_count(op):
    """numba's OpenMP layer shares torch's libgomp, and starting it sets the OpenMP thread count to
    numba's: a process that ran torch.set_num_threads(1) (a rank of a process group, a worker) must
    stay at 1 thread after its first fused op, or every later torch op oversubscribes the cores."""
    script = (f"import sys, torch; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
              "torch.set_num_threads(1); import test_threads as t; "
              f"t.{op}(); print(torch.get_num_threads())")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "FASTNOTES_BACKEND": "numba"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1", f"{op}: torch ran on {done.stdout.split()[-1]} threads after it"
