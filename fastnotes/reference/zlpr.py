"""ZLPR in plain torch (specs/zlpr.md, section 4): masked logsumexps with an appended zero."""
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
