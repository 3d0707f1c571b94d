"""`python -m fastnotes hubness FILE.npy --k 10 [--metric cosine] [--plot out.png]`: the k-occurrence
of every row of a saved [n, d] array (self excluded), its hubness statistics, the top hubs and,
with --plot, the N_k distribution."""
import argparse
import sys

import numpy as np
import torch

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
    args = parser.parse_args(argv)

    x = _load(args.file)
    try:
        counts = k_occurrence(x, args.k, metric=args.metric)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"hubness: {error}")
    stats = hubness_stats(counts, args.k, hub_size=args.hub_size)
    print(f"{args.file}: {x.shape[0]} points, d = {x.shape[1]}, k = {args.k}, metric {args.metric}, self excluded")
    for name, value in stats.items():
        print(f"  {name:20s} {value:.6g}")
    top = torch.argsort(counts, descending=True, stable=True)[:args.top]
    print(f"top {len(top)} hubs (index: N_{args.k}): " + ", ".join(f"{i}: {counts[i].item()}" for i in top.tolist()))
    if args.plot:
        plot_distribution(counts, args.k, args.plot,
                          f"{args.file.split('/')[-1]}: n = {x.shape[0]}, d = {x.shape[1]}, k = {args.k}, "
                          f"skewness {stats['skewness']:.2f}")
        print(f"N_{args.k} histogram written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
