"""Self-check cases for the EXACT expected-accuracy objective."""
import torch

from ..exact import expected_accuracy, gauss_hermite
from ..reference import exact as reference_exact
from ._common import fresh_generator


def _expected_accuracy_check(device, dtype):
    gen = fresh_generator()
    logits = torch.randn(32, 101, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 101, (32,), generator=gen)
    upstream = torch.randn(32, dtype=torch.float64, generator=gen)
    exact_x = logits.clone().requires_grad_()
    nodes, weights = gauss_hermite(32)
    exact = reference_exact.expected_accuracy(exact_x, labels, torch.full((32,), 0.5, dtype=torch.float64), None,
                                              nodes, weights)
    exact.backward(upstream)
    x = logits.to(device=device, dtype=dtype).requires_grad_()
    prob = expected_accuracy(x, labels.to(device), sigma=0.5)
    prob.backward(upstream.to(device=device, dtype=dtype))
    return {"value_error": (prob.double().cpu() - exact.detach()).abs().max().item(),
            "grad_error": (x.grad.double().cpu() - exact_x.grad).abs().max().item()}


def _expected_accuracy_timing(device):
    logits = torch.randn(256, 1000, device=device)
    labels = torch.randint(0, 1000, (256,), device=device)
    nodes, weights = gauss_hermite(32)
    sigma_rows = torch.full((256,), 0.5, device=device)

    def fused():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(expected_accuracy(x, labels, sigma=0.5).sum(), x)

    def composite():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(reference_exact.expected_accuracy(x, labels, sigma_rows, None, nodes, weights).sum(), x)

    return {"shape": "256x1000 fp32 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"expected_accuracy": (_expected_accuracy_check, _expected_accuracy_timing)}
