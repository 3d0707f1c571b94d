"""Self-check cases for hubness k-NN counting: the fused backend against the float64 brute force on
integer-valued points (every distance exact in float32 too, so counts and lists must match exactly,
exact ties included). No gradient: grad_error is 0."""
import torch

from ..hubness import k_occurrence, knn
from ..reference import hubness as reference
from ._common import fresh_generator


def _k_occurrence_check(device, dtype):
    gen = fresh_generator()
    x = torch.randint(-3, 4, (300, 6), generator=gen).to(dtype)
    exact_d, exact_i = reference.knn(x, None, 7)
    exact_counts = torch.bincount(exact_i.reshape(-1), minlength=300)
    counts = k_occurrence(x.to(device), 7).cpu()
    distances, indices = knn(x.to(device), 7)
    return {"value_error": max((counts - exact_counts).abs().max().item(),
                               (indices.cpu() != exact_i).double().mean().item(),
                               (distances.double().cpu() - exact_d).abs().max().item()),
            "grad_error": 0.0}


def _k_occurrence_timing(device):
    x = torch.randn(4000, 64, device=device)

    def composite():
        dist = torch.cdist(x, x).pow_(2)
        dist.fill_diagonal_(float("inf"))
        torch.bincount(dist.topk(10, largest=False).indices.reshape(-1), minlength=x.shape[0])

    return {"shape": "4000x64 k=10 fp32", "fused": lambda: k_occurrence(x, 10), "composite": composite}


CASES = {"k_occurrence": (_k_occurrence_check, _k_occurrence_timing)}
