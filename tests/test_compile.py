"""Every op inside torch.compile: the fused entry points run as graph breaks (_dispatch.eager_op), so a
compiled function around them gives the eager results and gradients. backend="eager" and "aot_eager"
exercise dynamo's tracing and AOT autograd without compiling C++ (inductor takes longer). In a test
session the kernels are loaded already; the first call in a fresh process (numba compiles or loads its
cache then) is checked in a subprocess."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

import fastnotes
from fastnotes import hubness
from fastnotes.diffusion import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(100)


def _case(name, gen):
    """(function of the differentiable inputs, those inputs): torch work before and after the op,
    so that dynamo has a graph on both sides of the break."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    if name == "multilabel_ce":
        targets = (torch.rand(6, 30, generator=gen) < 0.2).to(DEVICE)
        return lambda x: fastnotes.multilabel_ce(x * 2 - 1, targets) * 3, [randn(6, 30)]
    if name == "sparse_multilabel_ce":
        pos = torch.tensor([[0, 3, -1], [5, 1, 2]], device=DEVICE)
        return lambda x: fastnotes.sparse_multilabel_ce(x.tanh() * 4, pos) + 1, [randn(2, 9)]
    if name == "fused_linear_multilabel_ce":
        targets = (torch.rand(5, 40, generator=gen) < 0.1).to(DEVICE)
        return (lambda h, w: fastnotes.fused_linear_multilabel_ce(h.relu(), w * 0.5, targets).exp(),
                [randn(5, 8), randn(40, 8)])
    if name == "nm_class_ce":
        targets = torch.randint(0, 5, (3, 4), generator=gen).to(DEVICE)
        return lambda x: fastnotes.nm_class_ce(x.reshape(3, 4, 5) * 2, targets) ** 2, [randn(60)]
    if name == "exact_loss":
        labels = torch.randint(0, 7, (6,), generator=gen).to(DEVICE)
        return lambda x: fastnotes.exact_loss(x + 1, labels, sigma=0.7) * 2, [randn(6, 7)]
    if name == "relpos_attention":
        bias, post = randn(2, 8), randn(2, 8).abs() + 0.5
        return (lambda q, k, v: fastnotes.relpos_attention(q * 0.5, k, v.sin(), rel_bias=bias,
                                                           rel_buckets=(8, 16, True), post_table=post).sum(-1),
                [randn(1, 2, 5, 4), randn(1, 2, 5, 4), randn(1, 2, 5, 4)])
    if name == "ladder_merge":
        h = randn(6, 8)
        return (lambda s, w, b, a: fastnotes.ladder_merge(s.cos(), h, w, b, a) * 2,
                [randn(6, 3), randn(3, 8), randn(3), torch.tensor(0.2, device=DEVICE)])
    if name == "global_pointer_loss":
        spans = torch.tensor([[[[0, 2], [3, 3]], [[1, 4], [-1, -1]]]], device=DEVICE)
        return (lambda q, k: fastnotes.global_pointer_loss(q * 2, k.tanh(), spans, reduction="none") * 3,
                [randn(1, 6, 2, 4), randn(1, 6, 2, 4)])
    raise AssertionError(name)


DIFFERENTIABLE = ["multilabel_ce", "sparse_multilabel_ce", "fused_linear_multilabel_ce", "nm_class_ce",
                  "exact_loss", "relpos_attention", "ladder_merge", "global_pointer_loss"]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_op_under_compile(name, compiler, rng):
    fn, inputs = _case(name, rng)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compiler)
    eager_in = [x.clone().requires_grad_() for x in inputs]
    compiled_in = [x.clone().requires_grad_() for x in inputs]
    expected = fn(*eager_in)
    got = compiled(*compiled_in)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(expected.shape, generator=rng).to(DEVICE)
    expected_grads = torch.autograd.grad(expected, eager_in, upstream)
    got_grads = torch.autograd.grad(got, compiled_in, upstream)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_inference_ops_under_compile(rng):
    x = torch.randn(40, 6, generator=rng).to(DEVICE)
    eps = torch.randn(4, 3, 5, generator=rng).to(DEVICE)
    noise = torch.randn(4, 3, 5, generator=rng).to(DEVICE)

    def step(x_t):
        return fastnotes.sampler_step(x_t * 1.5, eps, 50, 40, SCHEDULE, method="ddpm", noise=noise) - 1

    def counts(points):
        return hubness.k_occurrence(points * 2, 3) + 1

    torch._dynamo.reset()
    x_t = torch.randn(4, 3, 5, generator=rng).to(DEVICE)
    torch.testing.assert_close(torch.compile(step, backend="eager")(x_t), step(x_t), rtol=0, atol=0)
    assert torch.equal(torch.compile(counts, backend="eager")(x), counts(x))


def test_amos_step_under_compile(rng):
    """A compiled training step (forward, backward, Amos step) follows the eager one exactly."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)
        return model, fastnotes.Amos(model.parameters(), lr=0.05)

    data = torch.randn(16, 6, generator=rng).to(DEVICE)
    target = torch.randn(16, 3, generator=rng).to(DEVICE)
    runs = []
    for compiled in (False, True):
        model, opt = make()

        def train_step(model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(data), target)
            loss.backward()
            opt.step()
            return loss.detach()

        torch._dynamo.reset()
        step = torch.compile(train_step, backend="eager") if compiled else train_step
        losses = torch.stack([step() for _ in range(4)])
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


_FIRST_CALLS = """
import torch
import test_compile as T
gen = torch.Generator().manual_seed(0)
for name in T.DIFFERENTIABLE:
    fn, inputs = T._case(name, gen)
    inputs = [x.requires_grad_() for x in inputs]
    out = torch.compile(fn, backend="eager")(*inputs)
    torch.autograd.grad(out.sum(), inputs)
x = torch.randn(4, 3, 5)
torch.compile(lambda v: T.fastnotes.sampler_step(v, v, 50, 40, T.SCHEDULE, method="ddpm", noise=v), backend="eager")(x)
torch.compile(lambda v: T.hubness.k_occurrence(v, 3), backend="eager")(torch.randn(30, 4))
print("first calls ok")
"""


def test_first_call_in_a_fresh_process_under_compile():
    """The very first call of each op (numba loads its kernels then) comes from a compiled function."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, *sys.path]))
    result = subprocess.run([sys.executable, "-c", _FIRST_CALLS], capture_output=True, text=True, env=env,
                            cwd=here, timeout=600)
    assert result.returncode == 0 and "first calls ok" in result.stdout, result.stderr[-3000:]
