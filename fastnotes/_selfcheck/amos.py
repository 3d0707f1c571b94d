"""Self-check cases for the Amos optimiser step (no gradient: grad_error is 0 by construction)."""
import torch

from .. import reference
from ..optim import Amos
from ._common import fresh_generator

_STEPS = 5


def _amos_check(device, dtype):
    """Parameters after a few fused steps vs the float64 reference: row, column and scalar slots,
    one group with momentum and clipping, one with other decay coefficients whose gradient has an
    entry whose square overflows the dtype (1e30 in float32, 1e200 in float64) in one step."""
    gen = fresh_generator()
    shapes_rules = [((33, 70), "row"), ((40, 17), "column"), ((257,), "row"), ((16, 24), "row")]
    theta0 = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.2 for s, _ in shapes_rules]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for s, _ in shapes_rules] for _ in range(_STEPS)]
    grads[2][3][5, 7] = 1e200 if dtype == torch.float64 else 1e30
    params = [torch.nn.Parameter(t.to(device=device, dtype=dtype, copy=True)) for t in theta0]
    hyper = {"lr": 0.02, "beta": 0.9}
    groups = [{"params": [params[0]], "slot": "row"}, {"params": [params[1]], "slot": "column", "momentum": 0.9,
                                                         "clip_value": 0.15}, {"params": [params[2]], "slot": "row"},
              {"params": [params[3]], "lr": 0.3, "c_coef": 0.6, "d_coef": 0.05, "beta": 0.99}]
    opt = Amos(groups, **hyper)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    error = 0.0
    for i, ((_, _), group) in enumerate(zip(shapes_rules, opt.param_groups)):
        theta = theta0[i]
        slot = tuple(opt.state[params[i]]["v"].shape)
        v = torch.zeros(slot, dtype=torch.float64)
        b = torch.zeros(slot, dtype=torch.float64)
        m = torch.zeros_like(theta)
        for t, step_grads in enumerate(grads):
            theta, v, b, m = reference.amos.amos_update(
                theta, step_grads[i], v, b, t + 1, lr=group["lr"], eta=opt.state[params[i]]["eta"], beta=group["beta"],
                momentum=group["momentum"], clip_value=group["clip_value"], c_coef=group["c_coef"],
                d_coef=group["d_coef"], m=m)
        scale = max(1.0, theta.abs().max().item())
        error = max(error, (params[i].detach().double().cpu() - theta).abs().max().item() / scale)
    return {"value_error": error, "grad_error": 0.0}


def _amos_timing(device):
    shapes = [(1024, 1024)] * 8 + [(1024,)] * 8
    gen = torch.Generator().manual_seed(0)

    def make():
        ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        return ps

    amos = Amos(make(), lr=1e-3)
    adamw = torch.optim.AdamW(make(), foreach=True)
    return {"shape": "8.4M params step vs AdamW(foreach)", "fused": amos.step, "composite": adamw.step}


CASES = {"amos_step": (_amos_check, _amos_timing)}
