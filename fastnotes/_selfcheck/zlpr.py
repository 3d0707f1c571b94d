"""Self-check cases for the multi-label softmax cross-entropy (ZLPR)."""
import torch
import torch.nn.functional as F

from .. import reference
from ..zlpr import fused_linear_multilabel_ce, multilabel_ce, sparse_multilabel_ce
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


def _positives(gen, rows, n_classes, k):
    index = torch.stack([torch.randperm(n_classes, generator=gen)[:k] for _ in range(rows)])
    index[::3, k // 2:] = -1  # padding
    return index


def _sparse_check(device, dtype):
    gen = fresh_generator()
    logits = torch.randn(32, 3001, generator=gen, dtype=torch.float64) * 4
    index = _positives(gen, 32, 3001, 8)
    upstream = torch.randn(32, dtype=torch.float64, generator=gen)
    exact_x = logits.clone().requires_grad_()
    exact = reference.sparse_multilabel_ce(exact_x, index, "none")
    exact.backward(upstream)
    x = logits.to(device=device, dtype=dtype).requires_grad_()
    loss = sparse_multilabel_ce(x, index.to(device), reduction="none")
    loss.backward(upstream.to(device=device, dtype=dtype))
    scale = max(1.0, exact.abs().max().item())
    return {"value_error": (loss.double().cpu() - exact.detach()).abs().max().item() / scale,
            "grad_error": (x.grad.double().cpu() - exact_x.grad).abs().max().item()}


def _sparse_timing(device):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 100000, generator=gen) * 3).to(device)
    index = torch.stack([torch.randperm(100000, generator=gen)[:10] for _ in range(64)]).to(device)
    dense = reference.positives_as_targets(index, 100000, torch.float32)

    def fused():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(sparse_multilabel_ce(x, index), x)

    def composite():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(reference.multilabel_ce_composite(x, dense).mean(), x)

    return {"shape": "64x100000 K=10 fp32 fwd+bwd", "fused": fused, "composite": composite}


def _fused_linear_check(device, dtype):
    """Loss and the gradients of hidden, weight and bias (max error over the three) through several
    row chunks, against autograd through the materialised float64 logits."""
    gen = fresh_generator()
    n, d, c = 50, 24, 700
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64) / d**0.5
    bias = torch.randn(c, generator=gen, dtype=torch.float64) - 2
    index = _positives(gen, n, c, 6)
    exact_args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    exact = reference.fused_linear_multilabel_ce(exact_args[0], exact_args[1], None, index, exact_args[2], "mean")
    exact.backward()
    args = [t.to(device=device, dtype=dtype).requires_grad_() for t in (hidden, weight, bias)]
    loss = fused_linear_multilabel_ce(args[0], args[1], pos_index=index.to(device), bias=args[2], chunk_size=16)
    loss.backward()
    return {"value_error": abs(loss.item() - exact.item()) / max(1.0, abs(exact.item())),
            "grad_error": max((a.grad.double().cpu() - e.grad).abs().max().item() for a, e in zip(args, exact_args))}


def _fused_linear_timing(device):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 256, generator=gen).to(device)
    weight = (torch.randn(32768, 256, generator=gen) / 16).to(device)
    index = torch.stack([torch.randperm(32768, generator=gen)[:10] for _ in range(512)]).to(device)
    dense = reference.positives_as_targets(index, 32768, torch.bool)

    def fused():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        torch.autograd.grad(fused_linear_multilabel_ce(h, w, pos_index=index), (h, w))

    def composite():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        torch.autograd.grad(multilabel_ce(F.linear(h, w), dense), (h, w))

    return {"shape": "512x256 @ 32768 labels fp32 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"multilabel_ce": (_multilabel_ce_check, _multilabel_ce_timing),
         "sparse_multilabel_ce": (_sparse_check, _sparse_timing),
         "fused_linear_multilabel_ce": (_fused_linear_check, _fused_linear_timing)}
