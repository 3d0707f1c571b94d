"""ZLPR (multilabel_ce) test cases: fresh random inputs, the float64 oracle and a run through the op."""
import torch

import fastnotes
from fastnotes import reference


def make_inputs(shape, kind, gen, dtype=torch.float32, scale=3.0):
    """Random logits and targets; kind in hard_bool | hard_float | hard_int | soft."""
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    hard = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3
    if kind == "hard_bool":
        targets = hard
    elif kind == "hard_float":
        targets = hard.to(dtype if dtype != torch.bfloat16 else torch.float32)
    elif kind == "hard_int":
        targets = hard.to(torch.int64)
    else:  # soft, with exact 0 and 1 entries mixed in
        targets = torch.rand(shape, generator=gen, dtype=torch.float64)
        targets = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.2, hard.double(), targets)
        targets = targets.to(torch.float32 if dtype != torch.float64 else dtype)
    return logits, targets


def oracle(logits, targets, mask=None, reduction="none"):
    """float64 reference loss."""
    t = targets if targets.dtype == torch.bool else targets.double()
    return reference.multilabel_ce(logits.double(), t, mask, reduction)


def oracle_with_grad(logits, targets, mask, upstream):
    """float64 reference loss and its gradient for the upstream gradient `upstream`."""
    x = logits.detach().double().requires_grad_()
    loss = oracle(x, targets, mask, "none")
    loss.backward(upstream.double())
    return loss.detach(), x.grad


def run_op(logits, targets, mask, upstream, reduction="none"):
    """(loss, grad) through fastnotes.multilabel_ce with the active backend."""
    x = logits.detach().clone().requires_grad_()
    loss = fastnotes.multilabel_ce(x, targets, mask=mask, reduction=reduction)
    if reduction == "none":
        loss.backward(upstream.to(loss.dtype))
    else:
        loss.backward()
    return loss.detach(), x.grad
