"""Ladder Side-Tuning's merge in plain torch: the float64 oracle of the fused op (docs/lst.md).

    o = a s + c (h W^T + b),  (a, c) = (mu, 1 - mu) with mu = sigmoid(alpha / T) (the paper's gate),
                              or (1, 1) when alpha is None (Su's plain add; b may be None)
Autograd differentiates the composite; the fused op's closed-form backward is checked against it.
"""
import torch


def gate_coefficients(alpha, temperature):
    """(a, c) as tensors: (mu, 1 - mu) with mu = sigmoid(alpha / T)."""
    mu = torch.sigmoid(alpha / temperature)
    return mu, 1 - mu


def ladder_merge(s, h, weight, bias=None, alpha=None, temperature=0.1):
    """s [..., d], h [..., D], weight [d, D], bias [d] or None, alpha a 0-d tensor or None."""
    z = h @ weight.transpose(0, 1)
    if bias is not None:
        z = z + bias
    if alpha is None:
        return s + z
    a, c = gate_coefficients(alpha, temperature)
    return a * s + c * z
