"""EXACT in plain torch (docs/exact.md): the Gauss-Hermite quadrature of
P = E_t prod_{i != y} Phi(r_i + t) over a [B, C, K] tensor, and the smooth-accuracy loss."""
import torch


R_MAX = 1e4  # |r| beyond this changes nothing: Phi(r + t) is 0 or 1 to every precision


def expected_accuracy(logits, labels, sigma_rows, margin, nodes, weights):
    """P(correct) per row [B] under logits + sigma * N(0, I); labels < 0 give 1. Autograd gives
    the gradients for logits and sigma. r = min(s_y - s_i, margin)/sigma saturates at +-R_MAX;
    rows where 1/sigma overflows (sigma -> 0) take r = sign(s_y - s_i) R_MAX, the hard argmax with
    ties split, with no gradient; ties of infinite logits count as ties and pass no gradient."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    ignored = (labels < 0)[:, None]
    work = torch.where(ignored, torch.zeros_like(work), work)  # whatever is there, no NaN gradient
    safe = labels.clamp_min(0)
    label_logit = work.gather(1, safe[:, None])
    margins = label_logit - work
    infinite_tie = torch.isinf(work) & (work == label_logit)  # inf - inf: a tie, not NaN
    margins = torch.where(infinite_tie, torch.zeros_like(margins), margins)
    if margin is not None:
        margins = margins.clamp(max=margin)
    sigma = sigma_rows.to(work.dtype)[:, None]
    limit = torch.isinf(1 / sigma)
    sigma = torch.where(limit, torch.ones_like(sigma), sigma)
    # clip before dividing, so that saturated entries pass no gradient to sigma either
    bound = R_MAX * sigma
    r = torch.minimum(torch.maximum(margins, -bound), bound) / sigma
    step = torch.where(margins == 0, 0, margins.detach() * float("inf")).clamp(-R_MAX, R_MAX)  # NaN stays
    r = torch.where(limit, step, r)
    own = torch.arange(work.shape[1], device=work.device)[None, :] == safe[:, None]
    r = torch.where(own, torch.tensor(float("inf"), dtype=work.dtype, device=work.device), r)
    log_terms = torch.special.log_ndtr(r[:, :, None] + nodes.to(work)).sum(dim=1)  # [B, K]
    prob = (weights.to(work) * torch.exp(log_terms)).sum(dim=1)
    return torch.where(labels < 0, torch.ones_like(prob), prob)


def smooth_accuracy_loss(logits, labels, tau=1.0):
    """Su's alternative: 1 - softmax(s / tau)_y per row."""
    return 1 - torch.softmax(logits / tau, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
