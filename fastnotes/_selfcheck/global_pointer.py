"""Self-check cases for the fused GlobalPointer + ZLPR loss."""
import torch

from ..global_pointer import global_pointer_loss
from ..reference import global_pointer as reference
from ._common import fresh_generator


def _spans(gen, batch, heads, lengths, per_row):
    """Random distinct closed spans (start <= end) inside each sample's length, padded with -1."""
    spans = torch.full((batch, heads, per_row, 2), -1, dtype=torch.int64)
    for b in range(batch):
        for h in range(heads):
            ends = torch.randint(0, lengths[b], (per_row,), generator=gen)
            starts = (ends - torch.randint(0, 4, (per_row,), generator=gen)).clamp(min=0)
            pairs = sorted(set(zip(starts.tolist(), ends.tolist())))[:int(torch.randint(0, per_row + 1, (1,),
                                                                                        generator=gen))]
            for p, pair in enumerate(pairs):
                spans[b, h, p] = torch.tensor(pair)
    return spans


def _loss_check(device, dtype, efficient):
    """Loss and the gradients of q, k (and type_bias) against the dense float64 composite, with
    padding, tril and RoPE, n spanning several tiles."""
    gen = fresh_generator()
    batch, n, heads, d = 2, 301, 3, 16
    lengths = [n, n - 40]
    shape = (batch, n, d) if efficient else (batch, n, heads, d)
    q, k = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
    type_bias = torch.randn(batch, n, heads, 2, generator=gen, dtype=torch.float64) if efficient else None
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    spans = _spans(gen, batch, heads, lengths, 5)
    exact_args = [t.clone().requires_grad_() for t in (q, k, type_bias) if t is not None]
    exact = reference.global_pointer_loss(*exact_args[:2], spans, mask, True, True,
                                          exact_args[2] if efficient else None, "mean")
    exact.backward()
    args = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, type_bias) if t is not None]
    loss = global_pointer_loss(*args[:2], spans.to(device), mask=mask.to(device),
                               type_bias=args[2] if efficient else None)
    loss.backward()
    return {"value_error": abs(loss.item() - exact.item()) / max(1.0, abs(exact.item())),
            "grad_error": max((a.grad.double().cpu() - e.grad).abs().max().item() for a, e in zip(args, exact_args))}


def _timing(device):
    gen = torch.Generator().manual_seed(0)
    batch, n, heads, d = 4, 256, 8, 64
    q, k = (torch.randn(batch, n, heads, d, generator=gen).to(device) for _ in range(2))
    spans = _spans(gen, batch, heads, [n] * batch, 4).to(device)

    def fused():
        a, b = q.detach().requires_grad_(), k.detach().requires_grad_()
        torch.autograd.grad(global_pointer_loss(a, b, spans), (a, b))

    def composite():
        a, b = q.detach().requires_grad_(), k.detach().requires_grad_()
        torch.autograd.grad(reference.global_pointer_loss(a, b, spans), (a, b))

    return {"shape": f"B={batch} n={n} H={heads} d={d} fp32 fwd+bwd", "fused": fused, "composite": composite}


CASES = {"global_pointer_loss": (lambda device, dtype: _loss_check(device, dtype, False), _timing),
         "global_pointer_loss[efficient]": (lambda device, dtype: _loss_check(device, dtype, True), _timing)}
