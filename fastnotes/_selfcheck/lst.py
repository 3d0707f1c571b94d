"""Self-check cases for Ladder Side-Tuning's fused ladder merge."""
import torch

from .. import reference
from ..lst import ladder_merge
from ._common import fresh_generator

_T = 0.1


def _ladder_merge_check(device, dtype):
    gen = fresh_generator()
    n, d, big_d = 200, 24, 96
    s, h, w, b, g = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                     for shape in ((n, d), (n, big_d), (d, big_d), (d,), (n, d)))
    w = w / big_d ** 0.5
    alpha = torch.tensor(0.04, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (s, w, b, alpha)]
    exact = reference.lst.ladder_merge(leaves[0], h, leaves[1], leaves[2], leaves[3], _T)
    exact_grads = torch.autograd.grad(exact, leaves, g)
    mine = [x.to(device=device, dtype=dtype).requires_grad_() for x in (s, w, b)]
    mine.append(alpha.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype).requires_grad_())
    out = ladder_merge(mine[0], h.to(device=device, dtype=dtype), mine[1], mine[2], mine[3], temperature=_T)
    grads = torch.autograd.grad(out, mine, g.to(device=device, dtype=dtype))

    def rel(got, want, scale=None):
        scale = max(1.0, want.abs().max().item()) if scale is None else scale
        return (got.detach().double().cpu() - want.detach()).abs().max().item() / scale

    # dalpha = mu (1 - mu) / T sum(g (s - z)) sums n d terms that largely cancel: scale its error by
    # the size of those terms, as float32 rounding of each one bounds it
    mu = torch.sigmoid(alpha / _T)
    z = h @ w.T + b
    alpha_terms = (mu * (1 - mu) / _T * (g.abs() * (s.abs() + z.abs())).sum()).item()
    grad_errors = [rel(a, e) for a, e in zip(grads[:3], exact_grads[:3])]
    grad_errors.append(rel(grads[3], exact_grads[3], max(1.0, alpha_terms)))
    return {"value_error": rel(out, exact), "grad_error": max(grad_errors)}


def _ladder_merge_timing(device):
    n, d, big_d = 4096, 96, 768
    s = torch.randn(n, d, device=device, requires_grad=True)
    h = torch.randn(n, big_d, device=device)
    w = (torch.randn(d, big_d, device=device) / big_d ** 0.5).requires_grad_()
    b = torch.zeros(d, device=device, requires_grad=True)
    alpha = torch.zeros((), device=device, requires_grad=True)
    g = torch.randn(n, d, device=device)

    def fused():
        torch.autograd.grad(ladder_merge(s, h, w, b, alpha, temperature=_T), (s, w, b, alpha), g)

    def composite():
        torch.autograd.grad(reference.lst.ladder_merge(s, h, w, b, alpha, _T), (s, w, b, alpha), g)

    return {"shape": "4096x768 -> 96 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"ladder_merge": (_ladder_merge_check, _ladder_merge_timing)}
