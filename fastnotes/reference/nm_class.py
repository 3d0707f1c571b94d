"""The "n x m classification" loss L1 in plain torch (docs/nm_class.md, 'Stable forms')."""
import torch

from .._checks import reduce


def nm_class_targets(targets, n_classes, dtype):
    """Soft targets [..., n, m] as given, or integer targets [..., n] (negative = padding task) as
    one-hot rows."""
    if targets.dtype.is_floating_point:
        return targets.to(dtype)
    valid = targets >= 0
    one_hot = torch.nn.functional.one_hot(torch.where(valid, targets, 0).long(), n_classes).to(dtype)
    return one_hot * valid.unsqueeze(-1).to(dtype)


def nm_class_ce(logits, targets, reduction="mean"):
    """Reference L1 = sum_j log(1 + sum_i t_ij (1/p_ij - 1)) per sample [..., n, m] (p = softmax over
    m), then reduced over the leading dimensions. Arguments are assumed valid.
    log(1/p_ij - 1) = lse_{k != j} s_ik - s_ij is taken from an [..., n, m, m] tensor: no cancellation
    and no singular gradient when p_ij -> 1 (a reference for small blocks, not a fast path)."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    t = nm_class_targets(targets, work.shape[-1], work.dtype)
    m = work.shape[-1]
    ninf = torch.tensor(float("-inf"), dtype=work.dtype, device=work.device)
    others = torch.where(torch.eye(m, dtype=torch.bool, device=work.device), ninf, work.unsqueeze(-2))
    # a class whose competitors are all -inf has p = 1 (log-odds -inf); logsumexp's gradient over
    # an all -inf row is NaN, so such rows take a dummy 0 that the where below discards
    alone = torch.isneginf(others).all(-1)
    lse_others = torch.logsumexp(torch.where(alone.unsqueeze(-1), 0.0, others), dim=-1)
    log_odds = torch.where(alone, ninf, lse_others) - work  # log(1/p_ij - 1)
    # the safe log keeps the unselected branch (t = 0) out of the gradient
    z = torch.where(t > 0, torch.log(torch.where(t > 0, t, 1)) + log_odds, ninf)
    zero_row = torch.zeros(z.shape[:-2] + (1, m), dtype=work.dtype, device=work.device)
    log_a = torch.logsumexp(torch.cat([z, zero_row], dim=-2), dim=-2)
    return reduce(log_a.sum(-1), reduction, logits.dtype)
