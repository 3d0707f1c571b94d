"""Benchmarks for the multi-device path (issue 13): the label-parallel ZLPR head and Amos under FSDP2.

    python bench/bench_distributed.py head [--labels 131072,1048576] [--rows 1024] [--dim 1024]
                                           [--input replicated]
    python bench/bench_distributed.py amos
    python bench/bench_distributed.py paper [--rows 4096]    # the table for P GPUs, from the byte model

head: fastnotes.distributed.label_parallel_multilabel_ce at world 2 on gloo (two spawned processes,
one thread each; input='data_parallel': each rank brings rows/2 rows, or --input replicated: every
rank all of them) against the single-process fused_linear_multilabel_ce on the whole batch and
weight, fp32, fwd+bwd with gradients for hidden,
weight and bias, 10 positives per row (pos_index). Each configuration runs in fresh processes: a
warm-up call at C = 4096 (kernels loaded), then the timed call, with the same rows per chunk for
both (the single op's default: zlpr.FUSED_CHUNK_BYTES of float32 logits of the WHOLE head, so the
per-rank chunk buffer is the rank's share of it).
  memory: peak resident set size during (weight + gradient allocation + the step) minus the RSS
          before, per process (bench/_shared.PeakRss: RSS polled every ms, VmHWM folded in;
          tracemalloc does not see torch's allocator); and the analytic sum of the buffers the op
          holds (weight, its float32 gradient, the chunk buffer, hidden and its gradient, gathered).
  bytes:  every torch.distributed collective the op calls is wrapped and counted: the payload a
          rank hands to it, and the bytes a rank sends under the ring algorithms (all-reduce
          2 (W-1)/W B, all-gather (W-1) B_in, reduce-scatter (W-1)/W B_in, all_gather_object: the
          pickled object W-1 times).
  time:   the timed call's wall time per rank, against the single process with 1 thread (one core
          per process, as one device per rank) and with 2 threads (the whole machine).
amos: one optimizer.step() per rank under FSDP2 at world 2 (one thread per rank) for Amos (row
slot) and torch.optim.AdamW(fused=True), same model (8 Linear layers 1024 <-> 4096, 33.6M
parameters, dim-0 shards), same gradients; 7 interleaved rounds after 2 warm-up steps, medians.
"""
import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastnotes-bench-numba-cache"))

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PeakRss  # noqa: E402

POSITIVES = 10
WARMUP_LABELS = 4096
MIB = 1 << 20


# ---- counting the collectives --------------------------------------------------------------------

class CollectiveCounter:
    """Wraps torch.distributed's collectives (the module attributes the ops call) and adds up, per
    rank, the payload handed to them and the bytes sent under the ring algorithms."""

    NAMES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
             "reduce_scatter_tensor", "all_gather", "all_gather_object")

    def __init__(self):
        self.calls, self.payload, self.sent = {}, {}, {}
        self._saved = {}

    def _add(self, name, payload, sent):
        self.calls[name] = self.calls.get(name, 0) + 1
        self.payload[name] = self.payload.get(name, 0) + payload
        self.sent[name] = self.sent.get(name, 0) + sent

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
        return False

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            group = kwargs.get("group")
            world = dist.get_world_size(group)
            if name == "all_reduce":
                b = args[0].numel() * args[0].element_size()
                self._add(name, b, 2 * (world - 1) * b // world)
            elif name in ("all_gather_single", "all_gather_into_tensor"):
                b = args[1].numel() * args[1].element_size()
                self._add(name, b, (world - 1) * b)
            elif name in ("reduce_scatter_single", "reduce_scatter_tensor"):
                b = args[1].numel() * args[1].element_size()
                self._add(name, b, (world - 1) * b // world)
            elif name == "all_gather":
                b = args[1].numel() * args[1].element_size()
                self._add(name, b, (world - 1) * b)
            elif name == "all_gather_object":
                b = len(pickle.dumps(args[1])) + 8  # the object and its size
                self._add(name, b, (world - 1) * b)
            return original(*args, **kwargs)
        return wrapped

    def total_sent(self):
        return sum(self.sent.values())


# ---- the label-parallel head ---------------------------------------------------------------------

def _head_case(n_rows, dim, n_labels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, dim, generator=gen)
    pos_index = torch.randint(0, n_labels, (n_rows, POSITIVES), generator=gen)
    # distinct per row (duplicates raise): sort and mark repeats as padding
    pos_index = pos_index.sort(1).values
    pos_index[:, 1:][pos_index[:, 1:] == pos_index[:, :-1]] = -1
    return hidden, pos_index


def _chunk_rows(n_labels):
    from fastnotes import zlpr
    return max(1, zlpr.FUSED_CHUNK_BYTES // (4 * n_labels))


def _analytic_bytes(n_rows_seen, n_rows_own, dim, labels_here, chunk_rows, data_parallel):
    """Bytes the op's buffers take on one process (fp32): weight + its gradient + bias and gradient,
    the chunk buffer, the hidden rows it multiplies and their gradient (gathered in data-parallel)."""
    weight = 2 * labels_here * dim * 4 + 2 * labels_here * 4
    chunk = min(chunk_rows, n_rows_seen) * labels_here * 4
    hidden = n_rows_seen * dim * 4 * 2 + (n_rows_own * dim * 4 if data_parallel else 0)
    return weight + chunk + hidden


def _single_head(n_rows, dim, n_labels, threads, out):
    import fastnotes
    torch.set_num_threads(threads)
    hidden, pos_index = _head_case(64, dim, WARMUP_LABELS)
    w = torch.randn(WARMUP_LABELS, dim, requires_grad=True)
    fastnotes.fused_linear_multilabel_ce(hidden, w, pos_index=pos_index).backward()
    hidden, pos_index = _head_case(n_rows, dim, n_labels)
    hidden.requires_grad_()
    with PeakRss() as rss:
        gen = torch.Generator().manual_seed(1)
        weight = (torch.randn(n_labels, dim, generator=gen) * dim ** -0.5).requires_grad_()
        bias = torch.zeros(n_labels, requires_grad=True)
        start = time.perf_counter()
        loss = fastnotes.fused_linear_multilabel_ce(hidden, weight, pos_index=pos_index, bias=bias,
                                                    chunk_size=_chunk_rows(n_labels))
        loss.backward()
        seconds = time.perf_counter() - start
    analytic = _analytic_bytes(n_rows, n_rows, dim, n_labels, _chunk_rows(n_labels), False)
    json.dump({"seconds": seconds, "rss": rss.peak - rss.before, "analytic": analytic, "loss": loss.item()},
              open(out, "w"))


def _label_parallel_rank(rank, world, n_rows, dim, n_labels, out_dir, mode):
    import fastnotes
    from fastnotes.distributed import label_parallel_multilabel_ce, shard_of
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(out_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    # data-parallel: each rank its share of the rows; replicated: every rank all of them
    own = slice(rank * n_rows // world, (rank + 1) * n_rows // world) if mode == "data_parallel" else slice(None)
    # warm-up: kernels loaded, gloo connected
    lo, size = shard_of(WARMUP_LABELS, rank, world)
    hidden, pos_index = _head_case(64, dim, WARMUP_LABELS)
    w = torch.randn(size, dim, requires_grad=True)
    label_parallel_multilabel_ce(hidden[rank::world], w, pos_index=pos_index[rank::world], label_offset=lo,
                                 num_labels=WARMUP_LABELS, input="data_parallel").backward()
    hidden, pos_index = _head_case(n_rows, dim, n_labels)
    hidden = hidden[own].clone().requires_grad_()
    lo, size = shard_of(n_labels, rank, world)
    dist.barrier()
    with PeakRss() as rss, CollectiveCounter() as counter:
        gen = torch.Generator().manual_seed(1)
        weight = (torch.randn(size, dim, generator=gen) * dim ** -0.5).requires_grad_()
        bias = torch.zeros(size, requires_grad=True)
        start = time.perf_counter()
        loss = label_parallel_multilabel_ce(hidden, weight, pos_index=pos_index[own], bias=bias, label_offset=lo,
                                            num_labels=n_labels, input=mode,
                                            chunk_size=_chunk_rows(n_labels))
        loss.backward()
        seconds = time.perf_counter() - start
    n_own, gathered = hidden.shape[0], mode == "data_parallel"
    analytic = _analytic_bytes(n_rows, n_own, dim, size, _chunk_rows(n_labels), gathered)
    json.dump({"seconds": seconds, "rss": rss.peak - rss.before, "analytic": analytic, "loss": loss.item(),
               "sent": counter.sent, "payload": counter.payload, "calls": counter.calls,
               "default_chunk_analytic": _analytic_bytes(n_rows, n_own, dim, size,
                                                         max(1, fastnotes.zlpr.FUSED_CHUNK_BYTES // (4 * size)),
                                                         gathered)},
              open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def run_head(labels, n_rows, dim, mode, world=2):
    import multiprocessing
    rows = []
    for n_labels in labels:
        result = {"C": n_labels}
        with tempfile.TemporaryDirectory() as tmp:
            for threads in (1, 2):
                out = os.path.join(tmp, f"single{threads}.json")
                p = multiprocessing.get_context("spawn").Process(target=_single_head,
                                                                 args=(n_rows, dim, n_labels, threads, out))
                p.start()
                p.join()
                result[f"single{threads}"] = json.load(open(out))
            torch.multiprocessing.start_processes(_label_parallel_rank,
                                                  args=(world, n_rows, dim, n_labels, tmp, mode),
                                                  nprocs=world, start_method="spawn")
            result["ranks"] = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
        rows.append(result)
        print(json.dumps(result), flush=True)
    return rows


def head_table(results, n_rows, dim, world, mode):
    share = f"{n_rows // world} per rank" if mode == "data_parallel" else "all of them on every rank"
    lines = [f"N = {n_rows} rows per step (the whole batch; {share}), D = {dim}, fp32, "
             f"world {world} (gloo, 1 thread per rank), input='{mode}', {POSITIVES} positives per row.",
             "",
             "| C | single RSS MiB | rank RSS MiB (max) | ratio | single analytic MiB | rank analytic MiB | ratio "
             "| bytes sent per rank per step | single s (1 thr) | single s (2 thr) | rank s (max) | vs 1 thr | vs 2 thr |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s1, s2, ranks = r["single1"], r["single2"], r["ranks"]
        single_rss = min(s1["rss"], s2["rss"])
        rank_rss = max(x["rss"] for x in ranks)
        rank_an = max(x["analytic"] for x in ranks)
        rank_s = max(x["seconds"] for x in ranks)
        sent = max(sum(x["sent"].values()) for x in ranks)
        lines.append(f"| {r['C']} | {single_rss / MIB:.0f} | {rank_rss / MIB:.0f} | {rank_rss / single_rss:.3f} "
                     f"| {s1['analytic'] / MIB:.0f} | {rank_an / MIB:.0f} | {rank_an / s1['analytic']:.3f} "
                     f"| {sent:,} | {s1['seconds']:.2f} | {s2['seconds']:.2f} | {rank_s:.2f} "
                     f"| {rank_s / s1['seconds']:.2f}x | {rank_s / s2['seconds']:.2f}x |")
    lines += ["", "Collectives per step, rank 0 (calls, payload bytes, bytes sent):", ""]
    for r in results:
        x = r["ranks"][0]
        parts = ", ".join(f"{k}: {x['calls'][k]} / {x['payload'][k]:,} / {x['sent'][k]:,}" for k in sorted(x["calls"]))
        lines.append(f"- C = {r['C']}: {parts}")
    return "\n".join(lines)


# ---- Amos vs AdamW(fused=True) under FSDP2 ------------------------------------------------------

def _amos_rank(rank, world, out_dir, rounds=7, warmup=2):
    import fastnotes
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(out_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)

    def model():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(1024, 4096) if i % 2 == 0 else torch.nn.Linear(4096, 1024) for i in range(8)]
        m = torch.nn.Sequential(*layers)
        for layer in m:
            fully_shard(layer)
        fully_shard(m)
        return m

    models = {"amos": model(), "adamw-fused": model()}
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(rank))
    for m in models.values():
        m(x).pow(2).mean().backward()  # the same gradients for both
    opts = {"amos": fastnotes.optim.Amos(models["amos"].parameters(), lr=1e-3),
            "adamw-fused": torch.optim.AdamW(models["adamw-fused"].parameters(), lr=1e-3, fused=True)}
    times = {k: [] for k in opts}
    for i in range(warmup + rounds):
        for name, opt in opts.items():
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    n_local = sum(p.to_local().numel() for p in models["amos"].parameters())
    json.dump({"median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "local_params": n_local},
              open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def run_amos(world=2):
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_amos_rank, args=(world, tmp), nprocs=world, start_method="spawn")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    print(json.dumps(ranks), flush=True)
    lines = ["| rank | local parameters | Amos ms | AdamW(fused=True) ms | Amos / AdamW |", "|---:|---:|---:|---:|---:|"]
    for r, x in enumerate(ranks):
        a, b = x["median_ms"]["amos"], x["median_ms"]["adamw-fused"]
        lines.append(f"| {r} | {x['local_params']:,} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return "\n".join(lines)


# ---- the table on paper --------------------------------------------------------------------------

def bytes_per_step(p, n_rows, dim, itemsize, mode):
    """Bytes one rank sends per step under the ring algorithms, as CollectiveCounter counts them
    (the model checked against the count at world 2 by `head`): the two [N, 2] float64 all-reduces
    of the combine, the argument agreement (all_gather_object, ~0.3 KB per rank), and in
    'data_parallel' the hidden all-gather and dH reduce-scatter, in 'replicated' the dH all-reduce."""
    lse = 2 * (p - 1) * (n_rows * 2 * 8) // p + 2 * (p - 1) * (n_rows * 2 * 8 + 8) // p
    agree = (p - 1) * 220
    if mode == "data_parallel":  # hidden and the int64 pos_index gathered, dH reduce-scattered
        data = (p - 1) * (n_rows // p) * (dim * itemsize + POSITIVES * 8) + (p - 1) * n_rows * dim * itemsize // p
    else:
        data = 2 * (p - 1) * n_rows * dim * itemsize // p
    return lse + agree + data


def paper_table(n_rows, dim=1024):
    gib = 1 << 30
    lines = [f"bf16 weights, D = {dim}, N = {n_rows} rows per step (the group's batch), input='data_parallel', "
             f"{POSITIVES} positives per row; per GPU. Gradient: the float32 accumulator the fused op fills "
             "(C/P x D x 4 B) and the bf16 .grad it hands back (x 2 B). Working: the 128 MiB chunk buffer "
             "(zlpr.FUSED_CHUNK_BYTES), the gathered hidden and its gradient, this rank's rows. Optimiser state: "
             "Amos with its default row slot (one float32 per label) vs AdamW with float32 moments (8 B per "
             "weight; fp32 master weights, if kept, not counted). Communication: the byte model of "
             "bytes_per_step (checked against the counted collectives at world 2), divided by the bandwidth; "
             "latency not included.",
             "",
             "| P | C | weight GiB | gradient GiB | Amos state GiB | AdamW state GiB | working GiB | MB sent per step "
             "| at 400 Gb/s (ms) | at 900 GB/s (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n_labels in (10 ** 7, 10 ** 8):
        for p in (8, 64, 256):
            local = -(-n_labels // p)
            weight = local * dim * 2
            gradient = local * dim * (4 + 2)
            amos = local * 4
            adamw = local * dim * 8
            working = 128 * MIB + 2 * n_rows * dim * 2 + (n_rows // p) * dim * 2
            sent = bytes_per_step(p, n_rows, dim, 2, "data_parallel")
            lines.append(f"| {p} | 10^{len(str(n_labels)) - 1} | {weight / gib:.2f} | {gradient / gib:.2f} "
                         f"| {amos / gib:.4f} | {adamw / gib:.2f} | {working / gib:.3f} | {sent / 1e6:.2f} "
                         f"| {1e3 * sent / 50e9:.3f} | {1e3 * sent / 900e9:.4f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="issue 13 benchmarks")
    parser.add_argument("what", choices=("head", "amos", "paper"))
    parser.add_argument("--labels", default="131072,1048576")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--input", default="data_parallel", choices=("data_parallel", "replicated"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}; load average {open('/proc/loadavg').read().split()[:3]}", flush=True)
    if args.what == "head":
        results = run_head([int(c) for c in args.labels.split(",")], args.rows, args.dim, args.input)
        for r in results:  # the byte model used for the paper table, checked against the count
            model = bytes_per_step(2, args.rows, args.dim, 4, args.input)
            measured = max(sum(x["sent"].values()) for x in r["ranks"])
            print(f"C = {r['C']}: bytes sent per rank {measured:,}, model {model:,} "
                  f"({100 * (measured - model) / model:+.2f}%)")
        print(head_table(results, args.rows, args.dim, 2, args.input))
    elif args.what == "amos":
        print(run_amos())
    else:
        print(paper_table(args.rows))
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
