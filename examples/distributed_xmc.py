"""Extreme multi-label classification on several processes: an FSDP2 encoder trained with
fastnotes.optim.Amos and a label-parallel fused ZLPR head (fastnotes.distributed).

    torchrun --nproc-per-node 2 examples/distributed_xmc.py                 # CPU, gloo
    torchrun --nproc-per-node 8 examples/distributed_xmc.py --backend nccl  # one GPU per process

Synthetic data: C labels (default 131 072) with Zipf-like popularity; a document holds 1-5 labels,
and its tokens are each label's 4 signature tokens (from a vocabulary of 32 768) plus 8 noise
tokens. The encoder (a bag of token embeddings, then a residual MLP block, width 128) is sharded
with torch.distributed.fsdp.fully_shard; each rank trains on its own batches (data parallel). The
head's [C, 128] weight is split by label over the same ranks: rank r holds about C / world rows
and the batch's hidden rows are all-gathered into the head and their gradients reduce-scattered
back (the Partial FC layout). Printed per epoch by rank 0: the training loss and precision@1/@5 on
held-out documents (each rank scores its label shard, the top-k are merged across ranks).
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard  # before init_process_group: see docs/zlpr.md, "Exiting cleanly"

from fastnotes.distributed import LabelParallelMultilabelCE
from fastnotes.optim import Amos

VOCAB, SIGNATURE, NOISE, MAX_LABELS = 32768, 4, 8, 5


def make_documents(n, num_labels, seed):
    """(tokens [n, 28] int64, positives [n, 5] global label ids padded with -1). Label l's signature
    tokens are a fixed hash of l; a padding slot holds random tokens instead."""
    gen = torch.Generator().manual_seed(seed)
    # Zipf-like popularity: label l drawn with weight 1 / (l + 10)
    popularity = 1.0 / (torch.arange(num_labels, dtype=torch.float64) + 10)
    counts = torch.randint(1, MAX_LABELS + 1, (n,), generator=gen)
    positives = torch.full((n, MAX_LABELS), -1, dtype=torch.int64)
    draws = torch.multinomial(popularity, n * MAX_LABELS, replacement=True, generator=gen).view(n, MAX_LABELS)
    for i in range(n):
        distinct = draws[i].unique()[:counts[i]]  # popular labels repeat: fewer when they do
        positives[i, :distinct.numel()] = distinct
    ids = positives.clamp(min=0)
    signature = (ids[:, :, None] * 7919 + torch.arange(SIGNATURE) * 104729 + 17) % VOCAB  # [n, 5, 4]
    signature = torch.where(positives[:, :, None] >= 0, signature, torch.randint(0, VOCAB, signature.shape,
                                                                                 generator=gen))
    noise = torch.randint(0, VOCAB, (n, NOISE), generator=gen)
    return torch.cat([signature.reshape(n, -1), noise], 1), positives


class Encoder(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(VOCAB, width, mode="mean")
        self.block = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width),
                                         torch.nn.GELU(), torch.nn.Linear(2 * width, width))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.norm(x + self.block(x))


def precision_at(encoder, head, tokens, positives, ks, device):
    """precision@k over held-out documents: each rank encodes its share of a block; head.topk
    scores every label shard and merges the ranks' candidates (k per row and rank cross the group,
    never [N, C])."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hits, n = {k: 0.0 for k in ks}, 0
    for lo in range(0, tokens.shape[0], 256 * world):
        block = tokens[lo:lo + 256 * world]
        rows = block.shape[0] // world  # an equal share for every rank (a ragged tail is dropped)
        if rows == 0:
            break
        with torch.no_grad():
            mine = encoder(block[rank * rows:(rank + 1) * rows].to(device))
        predicted = head.topk(mine, max(ks))[1].cpu()  # this rank's rows (the head is data-parallel)
        truth = positives[lo + rank * rows:lo + (rank + 1) * rows]
        for k in ks:
            correct = (predicted[:, :k, None] == truth[:, None, :]).any(-1)  # padding -1 never matches
            hits[k] += correct.float().sum().item() / k
        n += rows
    totals = torch.tensor([hits[k] for k in ks] + [n], dtype=torch.float64, device=device)
    dist.all_reduce(totals)  # every rank's rows
    return {k: (totals[i] / max(totals[-1].item(), 1)).item() for i, k in enumerate(ks)}


class Progress:
    """tqdm when it is installed, else a line every tenth of the epoch."""

    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, leave=False)
            except ImportError:
                pass

    def update(self, loss):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.enabled and (self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            print(f"  {self.desc}: {self.done}/{self.total} loss {loss:.3f}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--labels", type=int, default=131072)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--train", type=int, default=6144, help="training documents")
    parser.add_argument("--test", type=int, default=2048, help="held-out documents")
    parser.add_argument("--batch", type=int, default=256, help="documents per rank per step")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    torch.manual_seed(0)  # the same initial encoder on every rank before sharding
    encoder = Encoder(args.width).to(device)
    fully_shard(encoder.block)
    fully_shard(encoder)
    torch.manual_seed(1 + rank)  # each rank draws its own shard of the head
    head = LabelParallelMultilabelCE(args.width, args.labels, input="data_parallel").to(device)
    with torch.no_grad():
        head.bias.fill_(-math.log(args.labels))  # start near "no label": logits far below 0
    optimizer = Amos(list(encoder.parameters()) + list(head.parameters()), lr=args.lr)

    tokens, positives = make_documents(args.train + args.test, args.labels, seed=123)
    train_tokens, train_pos = tokens[:args.train], positives[:args.train]
    test_tokens, test_pos = tokens[args.train:], positives[args.train:]
    if rank == 0:
        print(f"{world} ranks ({args.backend}); {args.labels} labels, {head.weight.shape[0]} on rank 0; "
              f"{args.train} training documents, batch {args.batch} per rank", flush=True)
    steps = args.train // (args.batch * world)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(args.train, generator=torch.Generator().manual_seed(epoch))
        progress = Progress(steps, f"epoch {epoch + 1}", rank == 0)
        total = 0.0
        for step in range(steps):
            chosen = order[(step * world + rank) * args.batch:(step * world + rank + 1) * args.batch]
            optimizer.zero_grad()
            loss = head(encoder(train_tokens[chosen].to(device)), pos_index=train_pos[chosen].to(device))
            loss.backward()
            optimizer.step()
            total += loss.item()
            progress.update(loss.item())
        progress.close()
        precision = precision_at(encoder, head, test_tokens, test_pos, (1, 5), device)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {total / steps:.4f}  P@1 {precision[1]:.3f}  P@5 {precision[5]:.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
