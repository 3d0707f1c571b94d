"""Nested named entities with a GlobalPointer head trained by the fused ZLPR loss (docs/global_pointer.md).

A synthetic language: filler words, person names (PER, 1-3 name tokens), locations (LOC, 1-2
place tokens) and organisations (ORG) that nest a person: "<org word> <PER> inc", so the name
inside is a PER span and the whole phrase an ORG span. A tiny encoder (embedding + one
bidirectional GRU) feeds fastnotes.nn.GlobalPointer; spans have closed ends (end = the index of
the last token). Span-level F1 on held-out sentences is printed after each epoch (under a minute
on a laptop CPU).

Memory of the head: the bytes autograd keeps for the backward of the loss (saved-tensor hooks,
each storage counted once), for the fused head and for the dense head of the PyTorch ports
(materialised [B, H, n, n] scores + bert4keras's dense multilabel cross-entropy), at the training
shape and at a long-document shape. What is kept between forward and backward is the memory that
grows with the batch; it is deterministic, unlike an RSS reading on a shared machine.

    python examples/globalpointer_ner.py
"""
import random
import time

import torch

import fastnotes
from fastnotes.reference.global_pointer import span_targets
from fastnotes.reference.zlpr import multilabel_ce_composite

TYPES = ("PER", "LOC", "ORG")
PAD, FILLER, NAMES, PLACES, ORG_WORDS, INC = 0, range(1, 40), range(40, 52), range(52, 60), range(60, 64), 64
VOCAB = 65


def sentence(rng, max_len):
    """(tokens, spans) with spans [(type, start, end)], end closed."""
    tokens, spans = [], []
    while len(tokens) < max_len - 6:
        kind = rng.random()
        at = len(tokens)
        if kind < 0.55:
            tokens.append(rng.choice(FILLER))
        elif kind < 0.7:
            tokens += [rng.choice(NAMES) for _ in range(rng.randint(1, 3))]
            spans.append((0, at, len(tokens) - 1))
        elif kind < 0.82:
            tokens += [rng.choice(PLACES) for _ in range(rng.randint(1, 2))]
            spans.append((1, at, len(tokens) - 1))
        else:  # ORG nesting a PER: <org word> <name>+ inc
            tokens.append(rng.choice(ORG_WORDS))
            tokens += [rng.choice(NAMES) for _ in range(rng.randint(1, 2))]
            spans.append((0, at + 1, len(tokens) - 1))
            tokens.append(INC)
            spans.append((2, at, len(tokens) - 1))
    return tokens, spans


def batch(rng, size, max_len=32, max_spans=12):
    """tokens [B, n], mask [B, n], spans [B, H, P, 2] padded with -1."""
    sentences = [sentence(rng, rng.randint(max_len // 2, max_len)) for _ in range(size)]
    n = max(len(t) for t, _ in sentences)
    tokens = torch.full((size, n), PAD)
    spans = torch.full((size, len(TYPES), max_spans, 2), -1)
    for b, (toks, found) in enumerate(sentences):
        tokens[b, :len(toks)] = torch.tensor(toks)
        count = [0] * len(TYPES)
        for kind, start, end in found:
            if count[kind] < max_spans:
                spans[b, kind, count[kind]] = torch.tensor([start, end])
                count[kind] += 1
    return tokens, tokens != PAD, spans


class Tagger(torch.nn.Module):
    def __init__(self, width=64, head_size=32, efficient=False):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.encoder = torch.nn.GRU(width, width // 2, batch_first=True, bidirectional=True)
        self.head = fastnotes.nn.GlobalPointer(width, len(TYPES), head_size, efficient=efficient)

    def forward(self, tokens):
        return self.encoder(self.embed(tokens))[0]


def span_f1(model, batches):
    """Micro F1 of the decoded (batch, type, start, end) against the labelled spans."""
    hits = predicted = labelled = 0
    with torch.no_grad():
        for tokens, mask, spans in batches:
            got = {tuple(row) for row in model.head.decode(model(tokens), mask).tolist()}
            want = {(b, t, s, e) for b, t, p in (spans[..., 0] >= 0).nonzero().tolist()
                    for s, e in [spans[b, t, p].tolist()]}
            hits, predicted, labelled = hits + len(got & want), predicted + len(got), labelled + len(want)
    return 2 * hits / max(predicted + labelled, 1)


def saved_bytes(loss_fn):
    """Bytes autograd keeps for the backward of loss_fn(), each storage counted once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(seen.values())


def head_memory(head, batch_size, n, hidden_size):
    """(fused, dense) bytes kept for the backward of the head's loss from hidden states."""
    hidden = torch.randn(batch_size, n, hidden_size, requires_grad=True)
    mask = torch.ones(batch_size, n, dtype=torch.bool)
    spans = torch.tensor([[0, 2], [5, 9]]).expand(batch_size, head.num_types, 2, 2).contiguous()

    def dense():
        scores = head.scores(hidden, mask)
        targets = span_targets(spans, n).to(scores.dtype)
        return multilabel_ce_composite(scores.flatten(2), targets).mean()

    return saved_bytes(lambda: head.loss(hidden, spans, mask)), saved_bytes(dense)


def main(epochs=4, steps=30, seed=0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = Tagger()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = [batch(rng, 64) for _ in range(3)]
    start = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for _ in range(steps):
            tokens, mask, spans = batch(rng, 32)
            loss = model.head.loss(model(tokens), spans, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"epoch {epoch + 1}: loss {total / steps:.4f}  held-out span F1 {span_f1(model, held_out):.3f}  "
              f"({time.perf_counter() - start:.0f} s)")
    for label, shape in (("training shape", (32, 32)), ("long documents", (2, 1024))):
        fused, dense = head_memory(fastnotes.nn.GlobalPointer(64, 20, 32), *shape, 64)
        print(f"head memory kept for backward, B={shape[0]} n={shape[1]} H=20 d=32 ({label}): "
              f"fused {fused / 2**20:.1f} MiB, dense {dense / 2**20:.1f} MiB ({dense / fused:.0f}x)")
    return model


if __name__ == "__main__":
    main()
