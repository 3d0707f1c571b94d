"""Sharded and streamed k-occurrence (issue 14): time, per-rank peak memory and bytes sent of
k_occurrence(group=) at world 2 against one process on the same data, and the peak memory of the
streamed path on a .npy file 4x larger than the memory it is allowed.

    python bench/bench_hubness_distributed.py                   # n = 100 000, d = 128, k = 10; streamed 48 MiB
    python bench/bench_hubness_distributed.py --n 20000 --stream-limit-mib 16     # quick

Every measured run is a fresh process (spawned ranks for world 2) that imports torch and fastnotes
and warms the kernels on a tiny call first; then its RSS is taken as the baseline, the kernel's peak
RSS mark is reset (/proc/self/clear_refs, 5), the data is read and the op runs. "Peak" is the peak
RSS (VmHWM) minus that baseline: the memory of the data and the op, whatever the interpreter and
libraries hold (~0.5 GB here, the same for every process). The children run with
MALLOC_MMAP_THRESHOLD_=131072 (glibc's default, fixed), so freed buffers go back to the OS and the
peaks show live memory rather than the allocator's retention. Both sides run on the same 2 cores: one
process with 2 torch threads against 2 ranks of 1 thread each. Bytes sent: the reference rows a
rank sends around the ring (dist.isend, counted by wrapping it) and the payload of the collectives.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _warm_and_reset():
    """Import and warm the kernels, then (baseline RSS in bytes) with the peak mark reset."""
    import torch

    from fastnotes import hubness

    hubness.k_occurrence(torch.randn(500, 16), 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _write_gaussian(path, n, d, seed=0):
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 8192):
        out[start:start + 8192] = rng.standard_normal((min(8192, n - start), d), dtype=np.float32)
    out.flush()
    del out


def _child_single(args):
    import torch

    torch.set_num_threads(2)
    base = _warm_and_reset()
    from fastnotes import hubness

    x = torch.from_numpy(np.load(args.file))
    start = time.perf_counter()
    cpu = time.process_time()
    counts = hubness.k_occurrence(x, args.k)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    np.save(args.counts, counts.numpy())
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak": _status("VmHWM") - base}))


def _rank(rank, world, store_file, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world), rank=rank, world_size=world)
    base = _warm_and_reset()
    from fastnotes import hubness

    sent = {"ring": 0, "collectives": 0}
    isend = dist.isend

    def counting_isend(tensor, *a, **kw):
        sent["ring"] += tensor.numel() * tensor.element_size()
        return isend(tensor, *a, **kw)

    def counting(name, fn):
        def wrapped(tensor, *a, **kw):
            if isinstance(tensor, torch.Tensor):
                sent["collectives"] += tensor.numel() * tensor.element_size()
            return fn(tensor, *a, **kw)
        return wrapped

    dist.isend = counting_isend
    dist.all_reduce = counting("all_reduce", dist.all_reduce)
    mapped = np.load(args.file, mmap_mode="r")
    n = mapped.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    x = torch.from_numpy(np.array(mapped[lo:hi]))  # only this rank's rows, in memory
    del mapped
    dist.barrier()
    start = time.perf_counter()
    cpu = time.process_time()
    counts = hubness.k_occurrence(x, args.k, group=dist.group.WORLD)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if rank == 0:
        np.save(args.counts, counts.numpy())
    results.put((rank, {"seconds": seconds, "cpu": cpu, "peak": _status("VmHWM") - base, "sent": sent}))
    dist.barrier()
    dist.destroy_process_group()


def _child_ring(args):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        workers = [context.Process(target=_rank, args=(r, args.world, store, args, results))
                   for r in range(args.world)]
        for w in workers:
            w.start()
        out = dict(results.get(timeout=3600) for _ in workers)
        for w in workers:
            w.join()
    print(json.dumps([out[r] for r in range(args.world)]))


def _child_stream(args):
    import torch

    torch.set_num_threads(2)
    base = _warm_and_reset()
    from fastnotes import hubness

    start = time.perf_counter()
    counts = hubness.k_occurrence(args.file, args.k, block_rows=args.block_rows, ref_rows=args.ref_rows,
                                  progress=False)
    seconds = time.perf_counter() - start
    np.save(args.counts, counts.numpy())
    print(json.dumps({"seconds": seconds, "peak": _status("VmHWM") - base}))


def _run_child(mode, **options):
    command = [sys.executable, HERE, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    # glibc's dynamic mmap threshold keeps freed multi-MiB buffers (the kernels' tiles) in its heaps, and
    # RSS then grows with every call; the fixed default threshold returns them, so peaks show live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    run = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if run.returncode:
        raise SystemExit(f"{mode} run failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _mib(b):
    return b / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--stream-limit-mib", type=float, default=48.0,
                        help="memory the streamed run may use; its file is 4x this (0: skip)")
    parser.add_argument("--stream-d", type=int, default=2048)
    parser.add_argument("--block-rows", type=int, default=128)
    parser.add_argument("--ref-rows", type=int, default=512)
    parser.add_argument("--skip-ring", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--counts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return {"single": _child_single, "ring": _child_ring, "stream": _child_stream}[args.child](args)

    import torch

    import fastnotes

    print(f"fastnotes {fastnotes.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")
    print("load before:", os.getloadavg())
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        if not args.skip_ring:
            path = os.path.join(folder, "x.npy")
            _write_gaussian(path, args.n, args.d)
            one = _run_child("single", file=path, k=args.k, counts=os.path.join(folder, "one.npy"))
            ranks = _run_child("ring", file=path, k=args.k, world=args.world, counts=os.path.join(folder, "ring.npy"))
            equal = np.array_equal(np.load(os.path.join(folder, "one.npy")), np.load(os.path.join(folder, "ring.npy")))
            print(f"\nk_occurrence, n = {args.n}, d = {args.d}, k = {args.k}, float32 Gaussian "
                  f"(data {_mib(args.n * args.d * 4):.1f} MiB)")
            print(f"  one process (2 threads):  {one['seconds']:7.1f} s (CPU {one['cpu']:6.1f} s)   peak "
                  f"{_mib(one['peak']):7.1f} MiB")
            for r, res in enumerate(ranks):
                print(f"  world {args.world}, rank {r} (1 thread): {res['seconds']:7.1f} s (CPU {res['cpu']:6.1f} s)   peak "
                      f"{_mib(res['peak']):7.1f} MiB ({res['peak'] / one['peak']:.2f}x one process)   sent: ring "
                      f"{_mib(res['sent']['ring']):.1f} MiB, all-reduce {_mib(res['sent']['collectives']):.2f} MiB")
            worst = max(res["peak"] for res in ranks) / one["peak"]
            print(f"  counts equal to one process: {equal}; worst rank peak / one process = {worst:.2f} "
                  f"(target <= 0.6); wall time ratio {max(r['seconds'] for r in ranks) / one['seconds']:.2f}, "
                  f"CPU time ratio (all ranks / one process) {sum(r['cpu'] for r in ranks) / one['cpu']:.2f}")
            os.remove(path)
        if args.stream_limit_mib > 0:
            limit = args.stream_limit_mib * 2 ** 20
            d = args.stream_d
            n = int(4 * limit // (4 * d))
            path = os.path.join(folder, "big.npy")
            _write_gaussian(path, n, d, seed=1)
            size = os.path.getsize(path)
            res = _run_child("stream", file=path, k=args.k, block_rows=args.block_rows, ref_rows=args.ref_rows,
                             counts=os.path.join(folder, "stream.npy"))
            counts = np.load(os.path.join(folder, "stream.npy"))
            print(f"\nstreamed k_occurrence of a .npy path: n = {n}, d = {d}, k = {args.k}, file {_mib(size):.1f} MiB = "
                  f"{size / limit:.2f}x the limit {args.stream_limit_mib:.0f} MiB; block_rows {args.block_rows}, "
                  f"ref_rows {args.ref_rows}")
            print(f"  {res['seconds']:.1f} s, peak {_mib(res['peak']):.1f} MiB over the baseline: "
                  f"{'within' if res['peak'] < limit else 'OVER'} the limit; counts sum {int(counts.sum())} "
                  f"== k n: {int(counts.sum()) == args.k * n}")
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()
