"""Data-parallel estimate_gamma(..., group=) on torch.distributed with gloo (issue 13, part 3):
W spawned processes (world 2 and 3, uneven shares, one rank with none) each evaluate their share and
all get the table of one process on the concatenated data with the same per-sample noise
(../shared/DESIGN.md, "Multiple devices")."""
import math

import pytest
import torch
import torch.distributed as dist
from distributed_cases import spawn

from fastnotes.diffusion import NoiseSchedule, estimate_gamma
from fastnotes.diffusion.analytic import sample_noise_seed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = [1, 5, 40, 99, 100]
SEED = 123
SHARES = {2: [7, 3], 3: [4, 0, 6]}   # 10 samples in all; world 3 has a rank without data
# float64 sums of 10 terms of size ~1 in another order (per rank, then across ranks)
RTOL = 64 * torch.finfo(torch.float64).eps


def _schedule():
    return NoiseSchedule.linear(100)


def _data():
    return torch.randn(10, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _model(x, t):
    # per-sample (batch-independent) and nonlinear, so G_t depends on every noise draw
    return torch.tanh(1.7 * x) + (t.to(x) / 100).reshape(-1, 1, 1) * x.pow(2)


def _single(**kw):
    return estimate_gamma(_model, _data(), _schedule(), STEPS, n_samples=10, batch_size=4, seed=SEED,
                          progress=False, **kw)


def _share(rank, world):
    lo = sum(SHARES[world][:rank])
    return _data()[lo:lo + SHARES[world][rank]]


def _check_equal_tables(rank, world):
    group = dist.new_group(list(range(world)))
    share = _share(rank, world)
    # batch_size 3 here vs 4 in the single process: the draws depend on the global index only
    got = estimate_gamma(_model, share, _schedule(), STEPS, n_samples=100, batch_size=3, seed=SEED,
                         progress=False, group=group)
    want = _single()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    assert got[0] == 0 and got[2] == 0 and (got[STEPS] > 0).all()
    tables = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(tables, got)
    assert all(torch.equal(t, tables[0]) for t in tables), "ranks disagree on the table"
    # a callable share works the same
    got_callable = estimate_gamma(_model, lambda n: share[:n], _schedule(), STEPS, n_samples=50, seed=SEED,
                                  progress=False, group=group)
    torch.testing.assert_close(got_callable, want, rtol=RTOL, atol=0)


def _raises_everywhere(kind, match, **kw):
    args = dict(timesteps=STEPS, n_samples=10, seed=SEED, progress=False)
    args.update(kw)
    data = args.pop("data")
    with pytest.raises(kind, match=match):
        estimate_gamma(_model, data, _schedule(), **args)


def _check_bad_input(rank, world):
    group = dist.new_group(list(range(world)))
    share = _share(rank, world)
    _raises_everywhere(ValueError, "needs seed=", data=share, seed=None, group=group)
    _raises_everywhere(TypeError, "not both", data=share, generator=torch.Generator(), group=group)
    # one rank's bad argument: the same error on every rank, no hang
    _raises_everywhere(ValueError, r"timesteps must lie in \[1, 100\].*rank 1", data=share, group=group,
                       timesteps=STEPS + [101] if rank == 1 else STEPS)
    _raises_everywhere(ValueError, "timesteps differs between ranks", data=share, group=group,
                       timesteps=STEPS[:2] if rank == world - 1 else STEPS)
    _raises_everywhere(ValueError, "seed differs between ranks", data=share, group=group, seed=SEED + rank)
    _raises_everywhere(ValueError, "sample shape differs", data=share.reshape(share.shape[0], 6) if rank == 0
                       else share, group=group)
    _raises_everywhere(ValueError, "no data on any rank", data=share[:0], group=group)

    def broken(n):
        raise RuntimeError("loader died")
    _raises_everywhere(RuntimeError, "loader died.*rank 0", data=broken if rank == 0 else share, group=group)
    _raises_everywhere(TypeError, "ProcessGroup", data=share, group="world")
    # the group is still in step after all of these
    x = torch.ones(1)
    dist.all_reduce(x, group=group)
    assert x.item() == world


def _check_all(rank, world):
    _check_bad_input(rank, world)
    _check_equal_tables(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_estimate_gamma_data_parallel(world, tmp_path):
    spawn(world, _check_all, tmp_path, timeout_s=120)


def test_group_none_keeps_the_generator_draws():
    """group=None, seed=None: the draws and sums of the single-process code, bit for bit."""
    schedule, data = _schedule(), _data()
    got = estimate_gamma(_model, data, schedule, STEPS, n_samples=10, batch_size=4,
                         generator=torch.Generator().manual_seed(7), progress=False)
    gen, ab = torch.Generator().manual_seed(7), schedule.alphas_cumprod
    want = torch.zeros(schedule.num_steps + 1, dtype=torch.float64)
    for t in STEPS:
        total = 0.0
        for lo in range(0, 10, 4):
            batch = data[lo:lo + 4]
            x_t = math.sqrt(ab[t]) * batch + math.sqrt(1 - ab[t]) * torch.randn(batch.shape, generator=gen,
                                                                                 dtype=batch.dtype)
            out = _model(x_t, torch.full((batch.shape[0],), t, dtype=torch.int64))
            total += float(out.double().pow(2).mean(dim=(1, 2)).sum())
        want[t] = total / 10
    assert torch.equal(got, want)


def test_seeded_draws_are_per_sample():
    """seed=: sample i at step t draws from its own generator, whatever the batch size."""
    schedule, data = _schedule(), _data()
    got = estimate_gamma(_model, data, schedule, [40], n_samples=10, batch_size=10, seed=SEED, progress=False)
    ab = schedule.alphas_cumprod[40]
    eps = torch.stack([torch.randn(3, 2, generator=torch.Generator().manual_seed(sample_noise_seed(SEED, 40, i)),
                                   dtype=torch.float64) for i in range(10)])
    out = _model(ab.sqrt() * data + (1 - ab).sqrt() * eps, torch.full((10,), 40))
    torch.testing.assert_close(got[40], out.pow(2).mean(dim=(1, 2)).mean(), rtol=RTOL, atol=0)
    torch.testing.assert_close(_single(), estimate_gamma(_model, _data(), schedule, STEPS, n_samples=10,
                                                         batch_size=1, seed=SEED, progress=False), rtol=RTOL, atol=0)
    assert sample_noise_seed(SEED, 40, 0) != sample_noise_seed(SEED, 41, 0) != sample_noise_seed(SEED, 40, 1)


def test_group_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        _single(group=object())
