"""Self-check case for the experimental n x m classification loss."""
import torch

from .. import reference
from ..nm_class import nm_class_ce
from ._common import fresh_generator


def _nm_class_check(device, dtype):
    gen = fresh_generator()
    logits = torch.randn(16, 21, 9, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 9, (16, 21), generator=gen)
    labels[:, ::5] = -1  # padding tasks
    upstream = torch.randn(16, dtype=torch.float64, generator=gen)
    exact_x = logits.clone().requires_grad_()
    exact = reference.nm_class_ce(exact_x, labels, "none")
    exact.backward(upstream)
    x = logits.to(device=device, dtype=dtype).requires_grad_()
    loss = nm_class_ce(x, labels.to(device), reduction="none")
    loss.backward(upstream.to(device=device, dtype=dtype))
    scale = max(1.0, exact.abs().max().item())
    return {"value_error": (loss.double().cpu() - exact.detach()).abs().max().item() / scale,
            "grad_error": (x.grad.double().cpu() - exact_x.grad).abs().max().item()}


def _nm_class_timing(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 128, 10, generator=gen).to(device)
    labels = torch.randint(0, 10, (64, 128), generator=gen).to(device)

    def fused():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(nm_class_ce(x, labels), x)

    def composite():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(reference.nm_class_ce(x, labels, "mean"), x)

    return {"shape": "64 x [128 tasks, 10 classes] fp32 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"nm_class_ce": (_nm_class_check, _nm_class_timing)}
