"""The GlobalPointer span head (Su, kexue.fm/archives/8373; Efficient GlobalPointer, 8877) as a
module that owns its projections and trains through the fused loss. Math: docs/global_pointer.md."""
from typing import NamedTuple, Optional

import torch

from ..global_pointer import global_pointer_decode, global_pointer_loss, global_pointer_scores


class GlobalPointerProjections(NamedTuple):
    """What GlobalPointer.forward returns: q, k [B, n, H, d] (or [B, n, d] shared, efficient) and
    type_bias [B, n, H, 2] (efficient) or None, ready for fastnotes.global_pointer_loss/decode."""
    q: torch.Tensor
    k: torch.Tensor
    type_bias: Optional[torch.Tensor]


class GlobalPointer(torch.nn.Module):
    """GlobalPointer head over token states [B, n, hidden_size]: span scores for num_types types,
    trained with the fused ZLPR loss (the [B, H, n, n] scores are never stored).

    Parameters as in bert4keras (and the PyTorch ports), so their weights load one to one:
      efficient=False: `dense` Linear(hidden_size, num_types * 2 * head_size); type a reads the
        a-th chunk of 2 * head_size, q its first half, k its second.
      efficient=True: `dense` Linear(hidden_size, 2 * head_size) with q = its even features and
        k = its odd ones, shared by the types, plus `type_dense` Linear(2 * head_size, 2 * num_types)
        on the same features, halved: feature 2a + 1 is added at the start token of type a, 2a at
        the end token (bert4keras's EfficientGlobalPointer).
    Scores s(i, j) = <R_i q_i, R_j k_j> / sqrt(head_size) [+ type terms], RoPE if rope, pairs with
    i > j excluded if tril.

    Spans have a closed end: (start, end) = (index of the first token, index of the last token), so
    a one-token entity at position 4 is (4, 4) (not (4, 5): bojone/GlobalPointer issue 2).

    Use: `gp(hidden)` -> GlobalPointerProjections; `gp.loss(hidden, spans, mask)` for training;
    `gp.decode(hidden, mask)` for the predicted spans [M, 4] (batch, type, start, end);
    `gp.scores(hidden, mask)` for the dense [B, H, n, n] scores (small inputs, debugging).
    """

    def __init__(self, hidden_size, num_types, head_size, *, efficient=False, rope=True, tril=True, bias=True,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_types", num_types), ("head_size", head_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GlobalPointer: {name} must be a positive int, got {value!r}")
        if rope and head_size % 2:
            raise ValueError(f"GlobalPointer: RoPE needs an even head_size, got {head_size}")
        self.num_types, self.head_size = num_types, head_size
        self.efficient, self.rope, self.tril = bool(efficient), bool(rope), bool(tril)
        factory = dict(bias=bias, device=device, dtype=dtype)
        if self.efficient:
            self.dense = torch.nn.Linear(hidden_size, 2 * head_size, **factory)
            self.type_dense = torch.nn.Linear(2 * head_size, 2 * num_types, **factory)
        else:
            self.dense = torch.nn.Linear(hidden_size, num_types * 2 * head_size, **factory)

    def forward(self, hidden):
        """hidden [B, n, hidden_size] -> GlobalPointerProjections(q, k, type_bias)."""
        x = self.dense(hidden)
        if self.efficient:
            halves = self.type_dense(x) / 2  # [B, n, 2H]: odd features at the start, even at the end
            return GlobalPointerProjections(x[..., 0::2], x[..., 1::2],
                                            torch.stack((halves[..., 1::2], halves[..., 0::2]), dim=-1))
        x = x.unflatten(-1, (self.num_types, 2 * self.head_size))
        return GlobalPointerProjections(x[..., :self.head_size], x[..., self.head_size:], None)

    def _options(self):
        return dict(rope=self.rope, tril=self.tril)

    def loss(self, hidden, spans, mask=None, reduction="mean"):
        """The fused ZLPR loss of the span scores (fastnotes.global_pointer_loss): spans integer
        [B, num_types, P, 2] of (start, end), closed end, padded with -1; mask bool [B, n]."""
        q, k, type_bias = self(hidden)
        return global_pointer_loss(q, k, spans, mask=mask, type_bias=type_bias, reduction=reduction, **self._options())

    @torch.no_grad()
    def decode(self, hidden, mask=None, threshold=0.0):
        """Predicted spans int64 [M, 4] (batch, type, start, end), closed end, sorted: the allowed
        pairs with score > threshold (fastnotes.global_pointer_decode)."""
        q, k, type_bias = self(hidden)
        return global_pointer_decode(q, k, mask=mask, threshold=threshold, type_bias=type_bias, **self._options())

    def scores(self, hidden, mask=None):
        """The dense scores [B, num_types, n, n] (-inf where not allowed), differentiable; memory
        B * H * n^2: for small inputs and debugging."""
        q, k, type_bias = self(hidden)
        return global_pointer_scores(q, k, mask=mask, type_bias=type_bias, **self._options())

    def extra_repr(self):
        return (f"num_types={self.num_types}, head_size={self.head_size}, efficient={self.efficient}, "
                f"rope={self.rope}, tril={self.tril}")
