"""EXACT in plain torch (specs/exact.md sections 3 and 6): the Gauss-Hermite quadrature of
P = E_t prod_{i != y} Phi(r_i + t) over a [B, C, K] tensor, and the smooth-accuracy loss."""
import torch


def expected_accuracy(logits, labels, sigma_rows, margin, nodes, weights):
    """P(correct) per row [B] under logits + sigma * N(0, I); labels < 0 give 1. Autograd gives
    the gradients for logits and sigma."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    safe = labels.clamp_min(0)
    label_logit = work.gather(1, safe[:, None])
    margins = label_logit - work
    if margin is not None:
        margins = margins.clamp(max=margin)
    r = margins / sigma_rows.to(work.dtype)[:, None]
    own = torch.arange(work.shape[1], device=work.device)[None, :] == safe[:, None]
    r = torch.where(own, torch.tensor(float("inf"), dtype=work.dtype, device=work.device), r)
    log_terms = torch.special.log_ndtr(r[:, :, None] + nodes.to(work)).sum(dim=1)  # [B, K]
    prob = (weights.to(work) * torch.exp(log_terms)).sum(dim=1)
    return torch.where(labels < 0, torch.ones_like(prob), prob)


def smooth_accuracy_loss(logits, labels, tau=1.0):
    """Su's alternative: 1 - softmax(s / tau)_y per row."""
    return 1 - torch.softmax(logits / tau, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
