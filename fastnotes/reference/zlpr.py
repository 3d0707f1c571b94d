"""ZLPR in plain torch (docs/zlpr.md, 'Stable forms'): masked logsumexps with an appended zero."""
import torch

from .._checks import reduce


def _appended_zero_lse(x):
    zero = x.new_zeros(x.shape[:-1] + (1,))
    return torch.logsumexp(torch.cat([x, zero], dim=-1), dim=-1)


def multilabel_ce(logits, targets, mask=None, reduction="mean"):
    """Reference ZLPR loss. Works in the logits' dtype (float32 for float16/bfloat16); exact for
    masked entries, -inf logits and t in {0, 1} (excluded by selects). Arguments are assumed valid:
    fastnotes.multilabel_ce checks them."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    t = targets.to(work.dtype)
    valid = work != float("-inf")
    if mask is not None:
        valid = valid & mask
    ninf = torch.tensor(float("-inf"), dtype=work.dtype, device=work.device)
    pos = torch.where(valid & (t > 0), -work + torch.log(t), ninf)
    neg = torch.where(valid & (t < 1), work + torch.log1p(-t), ninf)
    return reduce(_appended_zero_lse(pos) + _appended_zero_lse(neg), reduction, logits.dtype)


def multilabel_ce_composite(logits, targets):
    """The composite users write today (bert4keras's hard-label form, ported to torch): flip signs,
    push the other class out of each logsumexp with 1e12, append a zero. Per-row losses. The
    benchmarks' eager baseline; not fp16-safe and hard labels only, which is why fastnotes exists."""
    y = targets.to(logits.dtype)
    flipped = (1 - 2 * y) * logits
    neg = flipped - y * 1e12
    pos = flipped - (1 - y) * 1e12
    return _appended_zero_lse(neg) + _appended_zero_lse(pos)


def positives_as_targets(pos_index, n_classes, dtype=torch.float64):
    """Dense {0, 1} targets [..., C] (contiguous) from positive indices [..., K] padded with -1 (no
    duplicates)."""
    work = torch.uint8 if dtype == torch.bool else dtype
    dense = torch.zeros(pos_index.shape[:-1] + (n_classes,), dtype=work, device=pos_index.device)
    # padding adds 0 at class 0; listed classes add 1
    dense.scatter_add_(-1, pos_index.clamp(min=0).long(), (pos_index >= 0).to(work))
    return dense.to(dtype)


def sparse_multilabel_ce(logits, pos_index, reduction="mean"):
    """Reference ZLPR with positives given as indices [..., K] (-1 = padding): the dense loss of the
    scattered {0, 1} targets. Arguments are assumed valid (no duplicates, indices in [-1, C))."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return multilabel_ce(logits, positives_as_targets(pos_index, logits.shape[-1], work.dtype), None, reduction)


def fused_linear_multilabel_ce(hidden, weight, targets=None, pos_index=None, bias=None, reduction="mean"):
    """Reference for the fused op: ZLPR of the materialised logits hidden @ weight.T + bias, with dense
    targets [N, C] or positive indices [N, K]."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if pos_index is not None:
        return sparse_multilabel_ce(logits, pos_index, reduction)
    return multilabel_ce(logits, targets, None, reduction)
