"""`python -m fastnotes hubness FILE.npy --k 10 [--metric cosine] [--plot out.png] [--out stats.json]
[--out counts.npy]`: the k-occurrence of every row of a saved [n, d] array (self excluded), its hubness
statistics, the top hubs and, with --plot, the N_k distribution. float32/float64 files are streamed
from disk in row blocks (memory-mapped, never loaded whole: fastnotes/hubness/stream.py); other numeric
files are loaded and converted to float32.

Under torchrun (`torchrun --nproc-per-node P -m fastnotes hubness FILE.npy --k 10`, detected from
WORLD_SIZE / RANK in the environment) the rows are split into P contiguous shards, each rank
memory-maps only its own rows, and k_occurrence(group=) passes the shards around the ring
(fastnotes/hubness/distributed.py); rank 0 prints the statistics and writes --plot and --out. The
process group is initialised (gloo; nccl with the shard on cuda:LOCAL_RANK when CUDA is available)
unless the caller already did."""
import argparse
import json
import os
import sys

import numpy as np
import torch

from . import stream
from .knn import METRICS, k_occurrence
from .stats import hubness_stats


def _load(path):
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SystemExit(f"hubness: cannot read {path}: {error}")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise SystemExit(f"hubness: {path} must hold a real [n, d] array, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64 if array.dtype == np.float64 else np.float32))


def _open(path):
    """(what k_occurrence takes, n, d): the path itself for a float32/float64 .npy file (streamed),
    else the array loaded as a tensor."""
    if not os.path.isfile(path):
        raise SystemExit(f"hubness: {path}: no such file")
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SystemExit(f"hubness: cannot read {path}: {error}")
    if not isinstance(header, np.ndarray):
        raise SystemExit(f"hubness: {path} must be a .npy file holding one array")
    if header.ndim == 2 and header.dtype in (np.float32, np.float64) and header.flags.c_contiguous:
        return path, header.shape[0], header.shape[1]
    del header
    x = _load(path)
    return x, x.shape[0], x.shape[1]


def _header(path):
    """(shape, dtype, byte offset of the data) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return shape, dtype, fortran, f.tell()


def _shard(path, rank, world):
    """(this rank's rows of the file as a tensor: a memory map of exactly those rows for a
    C-ordered float32/float64 file, else the loaded rows; n; d)."""
    if not os.path.isfile(path):
        raise SystemExit(f"hubness: {path}: no such file")
    try:
        shape, dtype, fortran, offset = _header(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"hubness: cannot read {path}: {error}")
    if len(shape) != 2:
        raise SystemExit(f"hubness: {path} must hold a real [n, d] array, got {dtype} {shape}")
    n, d = shape
    start = rank * (n // world) + min(rank, n % world)
    stop = start + n // world + (1 if rank < n % world else 0)
    if dtype in (np.float32, np.float64) and dtype.isnative and not fortran:
        if stop == start:
            return torch.empty((0, d), dtype=torch.float32 if dtype == np.float32 else torch.float64), n, d
        rows = np.memmap(path, dtype=dtype, mode="r", offset=offset + start * d * dtype.itemsize,
                         shape=(stop - start, d))
        return rows, n, d
    return _load(path)[start:stop].clone(), n, d


def _distributed_counts(args):
    """k_occurrence of the file's rows over the torchrun ranks: (counts [n] on every rank, n, d, rank)."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    cuda = torch.cuda.is_available()
    if started:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        x, n, d = _shard(args.file, rank, world)
        if cuda:
            x = torch.as_tensor(np.asarray(x)).cuda()
        try:
            counts = k_occurrence(x, args.k, metric=args.metric, group=dist.group.WORLD, ref_rows=args.block_rows)
        except (ValueError, TypeError, RuntimeError) as error:
            raise SystemExit(f"hubness: {error}" if rank == 0 else 1)
        return counts.cpu(), n, d, rank, world
    finally:
        if started:
            dist.destroy_process_group()


def _write_outputs(outputs, counts, summary):
    for out in outputs:
        if out.endswith(".json"):
            with open(out, "w") as f:
                json.dump(summary, f, indent=2)
                f.write("\n")
        else:
            np.save(out, counts.numpy())
        print(f"wrote {out}")


def plot_distribution(counts, k, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = counts.numpy()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.hist(values, bins=np.arange(values.max() + 2) - 0.5 if values.max() < 200 else 100, color="tab:blue")
    ax.axvline(k, color="tab:gray", linestyle="--", linewidth=1, label=f"mean = k = {k}")
    ax.set_yscale("log")
    ax.set_xlabel(f"N_{k} (k-occurrence)")
    ax.set_ylabel("points (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastnotes hubness", description=__doc__)
    parser.add_argument("file", help=".npy file holding an [n, d] array (one point per row)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per point (default 10)")
    parser.add_argument("--metric", default="sqeuclidean", choices=METRICS)
    parser.add_argument("--top", type=int, default=10, help="how many top hubs to list (default 10)")
    parser.add_argument("--hub-size", type=float, default=2.0, help="hubs have N_k >= hub_size * k (default 2)")
    parser.add_argument("--plot", help="write a histogram of N_k to this PNG")
    parser.add_argument("--out", action="append", default=[], metavar="FILE.json|FILE.npy",
                        help="write the statistics and top hubs (.json) or the counts, int64 [n] (.npy); "
                             "may be given twice")
    parser.add_argument("--block-rows", type=int, default=None,
                        help="rows per streamed block of queries and of references, or per ring transfer under "
                             "torchrun (default: 32 MiB of rows)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for out in args.out:
        if not out.endswith((".json", ".npy")):
            parser.error(f"--out must name a .json or a .npy file, got {out!r}")
    if args.block_rows is not None and args.block_rows < 1:
        parser.error(f"--block-rows must be a positive int, got {args.block_rows}")

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        counts, n, d, rank, world = _distributed_counts(args)
        if rank != 0:
            return 0
        how = f", sharded over {world} ranks"
    else:
        x, n, d = _open(args.file)
        streamed = stream.is_streamed(x)
        options = {"block_rows": args.block_rows, "ref_rows": args.block_rows,
                   "progress": False if args.no_progress else None} if streamed else {}
        try:
            counts = k_occurrence(x, args.k, metric=args.metric, **options)
        except (ValueError, TypeError) as error:
            raise SystemExit(f"hubness: {error}")
        how = ", streamed from disk" if streamed else ""
    stats = hubness_stats(counts, args.k, hub_size=args.hub_size)
    print(f"{args.file}: {n} points, d = {d}, k = {args.k}, metric {args.metric}, self excluded{how}")
    for name, value in stats.items():
        print(f"  {name:20s} {value:.6g}")
    top = torch.argsort(counts, descending=True, stable=True)[:args.top]
    print(f"top {len(top)} hubs (index: N_{args.k}): " + ", ".join(f"{i}: {counts[i].item()}" for i in top.tolist()))
    summary = {"file": args.file, "n": n, "d": d, "k": args.k, "metric": args.metric, "exclude_self": True,
               "hub_size": args.hub_size, "stats": {name: float(value) for name, value in stats.items()},
               "top_hubs": [{"index": i, "count": counts[i].item()} for i in top.tolist()]}
    _write_outputs(args.out, counts, summary)
    if args.plot:
        plot_distribution(counts, args.k, args.plot,
                          f"{args.file.split('/')[-1]}: n = {n}, d = {d}, k = {args.k}, "
                          f"skewness {stats['skewness']:.2f}")
        print(f"N_{args.k} histogram written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
