"""Amos under FSDP2 (DTensor parameters, dim-0 shards) and DDP, and the fused ops under DDP, on
torch.distributed with gloo: W processes spawned on localhost (world sizes 2 and 3, so shards are
uneven) compare with the single-process result on the concatenated batch (../shared/DESIGN.md,
"Multiple devices"). One spawn per world size runs every check: starting processes is what costs."""
import copy

import pytest
import torch
import torch.distributed as dist
from distributed_cases import spawn as _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = 12
BATCH = 12               # split evenly over 2 and 3 ranks
IN, HIDDEN, OUT = 7, 10, 5   # 10 and 5 rows: uneven dim-0 shards at world 3 (and 5 at world 2)
EPS32 = torch.finfo(torch.float32).eps


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).to(dtype)


def _data(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, IN, generator=gen, dtype=dtype), torch.randn(BATCH, OUT, generator=gen, dtype=dtype)


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


def _train_single(slot, momentum):
    import fastnotes
    model = _mlp()
    opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, slot=slot, momentum=momentum)
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, *_data(step)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def _assert_close_params(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        # float32 rounding: gradients summed in another order, slots updated in float64 vs float32;
        # each of the STEPS steps moves a parameter by about lr * eta, with an error of a few eps of it
        tol = 4 * EPS32 * STEPS * (1 + w.abs().max().item())
        err = (g - w).abs().max().item()
        assert err <= tol, f"{what}: parameter {i} differs from single-process Amos by {err:.3g} > {tol:.3g}"


def _row_of_last(param):
    # a callable slot: one value per entry of the last axis (the column rule), vectors: scalar
    return (1,) * (param.dim() - 1) + (param.shape[-1],) if param.dim() >= 2 else ()


SLOTS = ("row", "column", "scalar", "callable")


def _check_fsdp2(rank, world):
    import fastnotes
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    for slot in SLOTS:
        rule = _row_of_last if slot == "callable" else slot
        want, single = _train_single(rule, 0.9)
        model = _mlp()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, slot=rule, momentum=0.9)
        # the default eta is the global RMS at construction, not the RMS of this rank's shard
        etas = [opt.state[p]["eta"] for p in model.parameters()]
        assert etas == pytest.approx([single.state[p]["eta"] for p in single.param_groups[0]["params"]], rel=1e-12)
        for step in range(STEPS):
            opt.zero_grad()
            x, y = _data(step)
            _loss(model, x[mine], y[mine]).backward()
            opt.step()
        got = [p.full_tensor() for p in model.parameters()]
        _assert_close_params(got, want, f"FSDP2 world {world} slot {slot}")
        if slot == "row":  # the row slot of a matrix stays sharded with it
            w0 = next(model.parameters())
            assert opt.state[w0]["v"].placements == w0.placements


def _check_found_inf(rank, world):
    # a NaN gradient on one rank only: GradScaler skips the step on every rank
    import fastnotes
    from torch.distributed.fsdp import fully_shard
    model = _mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, slot="column", momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = [p.full_tensor() for p in model.parameters()]
    x, y = _data(0)
    scaler.scale(_loss(model, x, y)).backward()
    if rank == world - 1:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    scaler.step(opt)
    scaler.update()
    after = [p.full_tensor() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "a rank stepped on a non-finite gradient"
    assert scaler.get_scale() == 2.0 ** 7
    assert all(float(opt.state[p]["step"]) == 0 for p in model.parameters())
    # the next, finite step goes through on every rank, and stays finite
    opt.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())
    after = [p.full_tensor() for p in model.parameters()]
    assert all(torch.isfinite(a).all() and not torch.equal(a, b) for a, b in zip(after, before))


def _check_ddp_amos(rank, world):
    import fastnotes
    from torch.nn.parallel import DistributedDataParallel
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    want, _ = _train_single("row", 0.9)
    model = DistributedDataParallel(_mlp())
    opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _data(step)
        _loss(model, x[mine], y[mine]).backward()
        opt.step()
    _assert_close_params([p.detach() for p in model.parameters()], want, f"DDP world {world}")


# -- the other fused ops under DDP: gradients equal the single-process ones on the whole batch ----

class _MultilabelHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 9)

    def forward(self, x):
        import fastnotes
        targets = torch.sin(x[:, :1] * torch.arange(1, 10, dtype=x.dtype)) > 0.2  # per row, from the row
        return fastnotes.multilabel_ce(self.linear(x), targets)


class _ExactHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)

    def forward(self, x):
        import fastnotes
        target = (x[:, 0] * 1000).long().remainder(5)
        return fastnotes.exact_loss(self.linear(x), target, sigma=1.0)


class _Attention(torch.nn.Module):
    HEADS, LENGTH, DIM = 2, 5, 3

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(6, 3 * self.HEADS * self.DIM)
        self.rel_bias = torch.nn.Parameter(torch.randn(self.HEADS, 2 * self.LENGTH - 1) * 0.3)

    def forward(self, x):
        import fastnotes
        b = x.shape[0]
        tokens = torch.stack([x * (k + 1) / self.LENGTH for k in range(self.LENGTH)], dim=1)  # [b, L, 6]
        q, k, v = self.qkv(tokens).view(b, self.LENGTH, 3, self.HEADS, self.DIM).permute(2, 0, 3, 1, 4)
        out = fastnotes.relpos_attention(q, k, v, causal=True, rel_bias=self.rel_bias)
        return out.pow(2).mean()


class _Ladder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.side = torch.nn.Linear(6, 4)
        self.weight = torch.nn.Parameter(torch.randn(4, 6) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(4) * 0.1)
        self.alpha = torch.nn.Parameter(torch.tensor([0.05]))

    def forward(self, x):
        import fastnotes
        out = fastnotes.ladder_merge(self.side(x), x.sin(), self.weight, self.bias, self.alpha)
        return out.pow(2).mean()


OPS = {"multilabel_ce": _MultilabelHead, "exact_loss": _ExactHead, "relpos_attention": _Attention,
       "ladder_merge": _Ladder}


def _check_ddp_ops(rank, world):
    from torch.nn.parallel import DistributedDataParallel
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    x = torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, make in OPS.items():
        torch.manual_seed(0)
        single = make().double()
        torch.manual_seed(0)
        ddp = DistributedDataParallel(make().double())
        single(x).backward()
        ddp(x[mine]).backward()
        for (pname, want), got in zip(single.named_parameters(), ddp.parameters()):
            # float64 throughout: only the order of the sums differs
            tol = 1e-12 * (1 + want.grad.abs().max().item())
            err = (got.grad - want.grad).abs().max().item()
            assert err <= tol, f"{name} under DDP (world {world}): grad of {pname} differs by {err:.3g}"


def _check_dim1_rejected(rank, world):
    # a DTensor sharded along dim 1 (tensor parallel) has no exact slot rule here: it raises
    import fastnotes
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    with pytest.raises(NotImplementedError, match="placements"):
        fastnotes.optim.Amos([weight], lr=0.1)


def _check_dcp_to_one_process(rank, world):
    # torch.distributed.checkpoint's state dicts: saved from FSDP2 at world W (row slots sharded,
    # the vectors' scalar slots replicated), loaded into one process; training continues on the
    # same trajectory
    import fastnotes
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    model = _mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, momentum=0.9)
    half = STEPS // 2
    full = StateDictOptions(full_state_dict=True)
    for step in range(STEPS):
        if step == half:
            # a snapshot, as a checkpoint on disk would be (the step counts are the live tensors)
            model_state = copy.deepcopy(get_model_state_dict(model, options=full))
            optim_state = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))
        opt.zero_grad()
        x, y = _data(step)
        _loss(model, x[mine], y[mine]).backward()
        opt.step()
    want = [p.full_tensor() for p in model.parameters()]
    single = _mlp()
    single.load_state_dict(model_state)
    single_opt = fastnotes.optim.Amos(single.parameters(), lr=0.05, momentum=0.9)
    set_optimizer_state_dict(single, single_opt, optim_state, options=full)
    w0 = next(single.parameters())
    assert single_opt.state[w0]["v"].shape == (HIDDEN, 1) and float(single_opt.state[w0]["step"]) == half
    for step in range(half, STEPS):
        single_opt.zero_grad()
        _loss(single, *_data(step)).backward()
        single_opt.step()
    _assert_close_params([p.detach() for p in single.parameters()], want, f"DCP world {world} -> 1")


def _fsdp2_mlp():
    from torch.distributed.fsdp import fully_shard
    model = _mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _check_dcp_from_one_process(rank, world):
    # the reverse: full state dicts saved by one process load into FSDP2 at world W (each rank
    # keeps its shard of the parameters and of the row slots), and training continues on the
    # single-process trajectory
    import fastnotes
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    half = STEPS // 2
    full = StateDictOptions(full_state_dict=True)
    single = _mlp()
    single_opt = fastnotes.optim.Amos(single.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        if step == half:
            model_state = copy.deepcopy(get_model_state_dict(single, options=full))
            optim_state = copy.deepcopy(get_optimizer_state_dict(single, single_opt, options=full))
        single_opt.zero_grad()
        _loss(single, *_data(step)).backward()
        single_opt.step()
    want = [p.detach().clone() for p in single.parameters()]
    model = _fsdp2_mlp()
    opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, momentum=0.9)
    set_model_state_dict(model, model_state, options=full)
    set_optimizer_state_dict(model, opt, optim_state, options=full)
    w0 = next(model.parameters())
    v = opt.state[w0]["v"]
    assert isinstance(v, DTensor) and v.placements == w0.placements and tuple(v.shape) == (HIDDEN, 1)
    assert float(opt.state[w0]["step"]) == half
    for step in range(half, STEPS):
        opt.zero_grad()
        x, y = _data(step)
        _loss(model, x[mine], y[mine]).backward()
        opt.step()
    _assert_close_params([p.full_tensor() for p in model.parameters()], want, f"DCP 1 -> world {world}")


def _check_clip_grad_norm(rank, world):
    # torch.nn.utils.clip_grad_norm_ on FSDP2's DTensor gradients (the norm over every rank's shard)
    # before each Amos step: the single-process trajectory with clipping on the whole batch
    import fastnotes
    rows = BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    max_norm = 0.05
    single = _mlp()
    single_opt = fastnotes.optim.Amos(single.parameters(), lr=0.05, slot="column", momentum=0.9)
    model = _fsdp2_mlp()
    opt = fastnotes.optim.Amos(model.parameters(), lr=0.05, slot="column", momentum=0.9)
    for step in range(STEPS):
        x, y = _data(step)
        single_opt.zero_grad()
        _loss(single, x, y).backward()
        want_norm = torch.nn.utils.clip_grad_norm_(single.parameters(), max_norm)
        single_opt.step()
        opt.zero_grad()
        _loss(model, x[mine], y[mine]).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        assert abs(norm.item() - want_norm.item()) <= 1e-5 * want_norm.item(), f"step {step}: grad norm {norm} vs {want_norm}"
        if step == 0:
            assert want_norm.item() > max_norm, "the case must clip"
    _assert_close_params([p.full_tensor() for p in model.parameters()], [p.detach() for p in single.parameters()],
                         f"clip_grad_norm_ world {world}")


def _check_all(rank, world):
    _check_dim1_rejected(rank, world)
    _check_fsdp2(rank, world)
    _check_found_inf(rank, world)
    _check_ddp_amos(rank, world)
    _check_ddp_ops(rank, world)
    _check_dcp_to_one_process(rank, world)
    _check_dcp_from_one_process(rank, world)
    _check_clip_grad_norm(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_amos_fsdp2_ddp_and_ops_under_ddp(world, tmp_path):
    _spawn(world, _check_all, tmp_path)
