"""Ladder Side-Tuning on a synthetic task: a frozen transformer, a side network 1/8 as wide.

    python examples/lst_finetune.py [--steps 200]

Task: sequences of 32 tokens from a vocabulary of 64; the label says whether the sequence holds more
copies of token 1 than of token 2 (ties are re-drawn). The backbone (embedding + 4 encoder layers,
width 128) is first pretrained briefly on a related task (predicting the count of token 1), then
frozen. Two ways to fine-tune it for the new label, same steps and batches:
    full fine-tuning   every backbone weight trains (AdamW)
    LST                fastnotes.LadderSideNetwork (r = 8) trains beside the frozen backbone, with
                       fastnotes.optim.Amos; the backbone runs without an autograd graph
    LST, Fisher init   the same, its side blocks first pruned from the backbone's layers by the
                       empirical Fisher of the pretraining loss on 64 single task sequences
                       (fastnotes.lst.fisher_importance, init_from_backbone; the paper's fisher-v2)
Printed: accuracy on held-out data, trainable parameters, and the activation memory saved for the
backward pass (counted with torch.autograd.graph.saved_tensors_hooks, parameters excluded).
"""
import argparse
import math
import time

import torch

import fastnotes
from fastnotes.optim import Amos

VOCAB, SEQ, D_MODEL, HEADS, LAYERS, BATCH = 64, 32, 128, 4, 4, 32


def batch(n, gen):
    x = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    ones, twos = (x == 1).sum(1), (x == 2).sum(1)
    keep = ones != twos
    return x[keep], (ones > twos)[keep].long(), ones[keep].float()


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(
            D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True) for _ in range(LAYERS))

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return h


def pretrain(backbone, steps, gen):
    """A related task: regress the count of token 1 from the mean-pooled states."""
    probe = torch.nn.Linear(D_MODEL, 1)
    opt = torch.optim.AdamW([*backbone.parameters(), *probe.parameters()], lr=1e-3)
    for _ in range(steps):
        x, _, count = batch(BATCH, gen)
        loss = torch.nn.functional.mse_loss(probe(backbone(x).mean(1)).squeeze(1), count)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


def saved_bytes(fn):
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values()) / 1e6


def train(model, head, params, make_opt, steps, gen):
    opt = make_opt(params)
    for _ in range(steps):
        x, y, _ = batch(BATCH, gen)
        loss = torch.nn.functional.cross_entropy(head(model(x).mean(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model, head, gen):
    with torch.no_grad():
        x, y, _ = batch(1024, gen)
        return (head(model(x).mean(1)).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a model this small spends more time in thread barriers than in work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = Backbone()
    probe = pretrain(backbone, args.pretrain_steps, torch.Generator().manual_seed(1))
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe_x, _, _ = batch(16, torch.Generator().manual_seed(3))

    # full fine-tuning
    full = Backbone()
    full.load_state_dict(pretrained)
    head = torch.nn.Linear(D_MODEL, 2)
    start = time.perf_counter()
    train(full, head, [*full.parameters(), *head.parameters()], lambda ps: torch.optim.AdamW(ps, lr=1e-4),
          args.steps, torch.Generator().manual_seed(2))
    full_time = time.perf_counter() - start
    full_acc = accuracy(full, head, torch.Generator().manual_seed(4))
    full_mem = saved_bytes(lambda: head(full(probe_x).mean(1)).sum())
    full_params = sum(p.numel() for p in [*full.parameters(), *head.parameters()])

    print(f"{'method':<20}{'accuracy':>10}{'trainable':>12}{'saved for bwd (16 seqs)':>26}{'train time':>12}")
    print(f"{'full fine-tuning':<20}{full_acc:>10.3f}{full_params:>12,}{full_mem:>23.2f} MB{full_time:>11.1f}s")
    for name, fisher_init in (("LST (r=8) + Amos", False), ("  + Fisher init", True)):
        # the backbone's embedding output is the side input, its layers are laddered
        frozen = Backbone()
        frozen.load_state_dict(pretrained)
        side = fastnotes.LadderSideNetwork.from_hooks(frozen, [frozen.embed, *frozen.layers], D_MODEL,
                                                      reduction=8, n_heads=4)
        if fisher_init:
            task_x, _, task_count = batch(64, torch.Generator().manual_seed(5))
            fisher = fastnotes.lst.fisher_importance(
                frozen, lambda i: (probe(frozen(task_x[i:i + 1]).mean(1)).squeeze() - task_count[i]) ** 2,
                range(len(task_x)))
            side.init_from_backbone(fisher)
        head = torch.nn.Linear(D_MODEL, 2)
        trainable = [*side.parameters(), *head.parameters()]
        start = time.perf_counter()
        train(side, head, trainable, lambda ps: Amos(ps, lr=1 / math.sqrt(args.steps), beta=0.98, momentum=0.9),
              args.steps, torch.Generator().manual_seed(2))
        lst_time = time.perf_counter() - start
        lst_acc = accuracy(side, head, torch.Generator().manual_seed(4))
        lst_mem = saved_bytes(lambda: head(side(probe_x).mean(1)).sum())
        assert all(p.grad is None for p in frozen.parameters()), "a gradient reached the frozen backbone"
        print(f"{name:<20}{lst_acc:>10.3f}{sum(p.numel() for p in trainable):>12,}"
              f"{lst_mem:>23.2f} MB{lst_time:>11.1f}s")
    print(f"LST keeps {100 * lst_mem / full_mem:.0f}% of full fine-tuning's saved activations")


if __name__ == "__main__":
    main()
