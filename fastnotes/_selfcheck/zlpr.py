"""Self-check cases for the multi-label softmax cross-entropy (ZLPR)."""
import torch

from .. import reference
from ..losses import multilabel_ce
from ._common import fresh_generator


def _multilabel_ce_check(device, dtype):
    gen = fresh_generator()
    logits = (torch.randn(64, 1001, generator=gen, dtype=torch.float64) * 4)
    targets = torch.rand(64, 1001, generator=gen, dtype=torch.float64)
    targets = torch.where(torch.rand(64, 1001, generator=gen, dtype=torch.float64) < 0.5, (targets > 0.9).double(), targets)
    mask = torch.rand(64, 1001, generator=gen) < 0.9
    upstream = torch.randn(64, dtype=torch.float64, generator=gen)
    exact_x = logits.clone().requires_grad_()
    exact = reference.multilabel_ce(exact_x, targets, mask, "none")
    exact.backward(upstream)
    x = logits.to(device=device, dtype=dtype).requires_grad_()
    loss = multilabel_ce(x, targets.to(device=device, dtype=dtype), mask=mask.to(device), reduction="none")
    loss.backward(upstream.to(device=device, dtype=dtype))
    scale = max(1.0, exact.abs().max().item())
    return {"value_error": (loss.double().cpu() - exact.detach()).abs().max().item() / scale,
            "grad_error": (x.grad.double().cpu() - exact_x.grad).abs().max().item()}


def _multilabel_ce_timing(device):
    logits = torch.randn(256, 20000, device=device) * 3
    targets = (torch.rand(256, 20000, device=device) < 0.01).float()

    def fused():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(multilabel_ce(x, targets), x)

    def composite():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(reference.multilabel_ce_composite(x, targets).mean(), x)

    return {"shape": "256x20000 fp32 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"multilabel_ce": (_multilabel_ce_check, _multilabel_ce_timing)}
