"""The EXACT paper's three-point toy problem (docs/exact.md), trained three ways.

Points x = -0.25, 0, 0.25 with labels -, -, +; model f(x) = x - b, predict sign(f). Perfect accuracy
needs b in (0, 0.25). Cross-entropy settles at b ~ 0.70 and hinge on [0.75, 1]: both misclassify
x = 0.25. EXACT at a small temperature (sigma = 0.1) maximises the probability of being right and
lands inside (0, 0.25).

    python examples/exact_toy.py
"""
import torch

import fastnotes

X = torch.tensor([-0.25, 0.0, 0.25], dtype=torch.float64)
LABELS = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)


def loss_fn(name, b):
    f = X - b
    if name == "cross-entropy":
        return torch.nn.functional.softplus(-LABELS * f).sum()
    if name == "hinge":
        return torch.relu(1 - LABELS * f).sum()
    logits = torch.stack([torch.zeros_like(f), f], dim=1)  # class 1 = positive
    return fastnotes.exact_loss(logits, (LABELS > 0).long(), sigma=0.1, reduction="sum")


def train(name, steps=600, lr=0.02):
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([b], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(name, b).backward()
        optimizer.step()
    b = b.detach()
    accuracy = ((torch.sign(X - b) == LABELS).double().mean()).item()
    return b.item(), accuracy


def run():
    return {name: train(name) for name in ("cross-entropy", "hinge", "exact")}


if __name__ == "__main__":
    for name, (b, accuracy) in run().items():
        print(f"{name:14s} b = {b:.3f}   accuracy = {accuracy:.3f}")
