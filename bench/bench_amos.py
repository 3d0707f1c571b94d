"""Benchmarks for fastnotes.optim.Amos against torch's AdamW (and Adafactor) on ~100M parameters.

    pytest bench/bench_amos.py --benchmark-json=bench/results/amos.json
    python bench/bench_amos.py bench/results/amos.json --out BENCHMARKS.md

The tensor set is a stack of Linear-like weights and biases, 100,704,256 parameters in all:
20 x [1024, 4096], 4 x [2048, 2048], 40 x [1024], fp32, with fixed random gradients.
Contenders (one optimiser step over all of them; the same tensors for every contender):
    fastnotes-numba           Amos, default slots (one per row of each matrix, one per vector)
    fastnotes-numba-momentum  the same with momentum 0.9 (the BERT recipe): one full-size slot
    fastnotes-triton          Amos on CUDA (GPU machines only)
    adamw-foreach             torch.optim.AdamW(foreach=True)
    adamw-fused               torch.optim.AdamW(fused=True), where this torch has it for the device
    adafactor                 torch.optim.Adafactor (factored second moment, no momentum), for scale
Recorded per contender: the median step time, the compulsory traffic (bytes), and the optimiser
state in bytes (every tensor in optimizer.state). Rounds run back to back after 2 warm-up steps.
"""
import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastnotes-bench-numba-cache"))

import pytest
import torch

OP = "amos_step"
SHAPES = [(1024, 4096)] * 20 + [(2048, 2048)] * 4 + [(1024,)] * 40
N_PARAMS = sum(torch.Size(s).numel() for s in SHAPES)
CONTENDERS = ["fastnotes-numba", "fastnotes-numba-momentum", "fastnotes-triton", "adamw-foreach", "adamw-fused",
              "adafactor"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ROUNDS = 5
# compulsory bytes per fp32 parameter: theta read + written, g read; AdamW adds m and v read + written,
# Amos's momentum adds m read + written; the reduced slots are negligible
BYTES_PER_PARAM = {"amos": 12, "amos-momentum": 20, "adamw": 28, "adafactor": 12}


@pytest.fixture(scope="module", params=DEVICES)
def tensors(request):
    device = request.param
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(p)
    yield device, params
    del params


def _make_optimizer(contender, params, device):
    import fastnotes
    from fastnotes.optim import Amos

    if contender.startswith("fastnotes-"):
        backend = "triton" if contender == "fastnotes-triton" else "numba"
        if fastnotes._dispatch.availability(backend, device) is not None:
            pytest.skip(f"{backend} does not run on {device}")
        momentum = 0.9 if contender.endswith("momentum") else None
        opt = Amos(params, lr=1e-3, momentum=momentum)
        return opt, backend, "amos-momentum" if momentum else "amos"
    if contender == "adamw-foreach":
        return torch.optim.AdamW(params, foreach=True), None, "adamw"
    if contender == "adamw-fused":
        try:
            opt = torch.optim.AdamW(params, fused=True)
            opt.step()  # raises here when this torch has no fused kernel for the device
        except RuntimeError as exc:
            pytest.skip(f"AdamW(fused=True) unavailable: {exc}")
        return opt, None, "adamw"
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("this torch has no torch.optim.Adafactor")
    return torch.optim.Adafactor(params, foreach=True), None, "adafactor"


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("contender", CONTENDERS)
def test_optimizer_step(benchmark, tensors, contender):
    import fastnotes
    from fastnotes import _env

    device, params = tensors
    if contender == "fastnotes-triton" and device != "cuda":
        pytest.skip("triton runs on CUDA")
    opt, backend, kind = _make_optimizer(contender, params, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.step()
        sync()

    with fastnotes.use_backend(backend):
        step()  # warm-up: compilation and first-touch of the state
        step()
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({
        "op": OP, "shape": [N_PARAMS], "mode": "step", "contender": contender, "device": device,
        **_env.device_info(device), "versions": _env.versions(), "bytes": BYTES_PER_PARAM[kind] * N_PARAMS,
        "state_bytes": state_bytes(opt), "n_tensors": len(SHAPES)})


INTERLEAVED = ["fastnotes-numba", "adamw-foreach", "adamw-fused"]


@pytest.mark.parametrize("grad_scaler", [False, True], ids=["plain", "grad_scaler"])
def test_interleaved_steps(benchmark, tensors, grad_scaler):
    """The machines are shared and drift within minutes: step the three main contenders in turn,
    each round one step each, and record every contender's median (extra_info["medians_s"]). With
    grad_scaler, each step goes through torch.amp.GradScaler (scaler.step, scaler.update): fused
    AdamW takes the scale into its step, the others get GradScaler's unscale pass."""
    import time

    import fastnotes
    from fastnotes import _env

    device, params = tensors
    if device != "cpu":
        pytest.skip("the interleaved comparison is for the CPU")
    made = {name: _make_optimizer(name, params, device) for name in INTERLEAVED}
    times = {name: [] for name in made}
    scalers = {name: torch.amp.GradScaler(device, init_scale=2.0 ** 10) for name in made} if grad_scaler else {}
    for scaler in scalers.values():
        scaler.scale(torch.ones((), device=device))  # initialises the scale; the gradients stay as they are
    grads = [p.grad.clone() for p in params] if grad_scaler else None  # unscale_ rewrites them

    def one_round():
        for name, (opt, backend, _) in made.items():
            if grad_scaler:
                torch._foreach_copy_([p.grad for p in params], grads)
            with fastnotes.use_backend(backend):
                start = time.perf_counter()
                if grad_scaler:
                    scalers[name].step(opt)
                    scalers[name].update()
                else:
                    opt.step()
                times[name].append(time.perf_counter() - start)

    one_round()  # warm-up
    for values in times.values():
        values.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS + 2, iterations=1, warmup_rounds=0)
    medians = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    benchmark.extra_info.update({
        "op": OP, "shape": [N_PARAMS], "mode": "interleaved-amp" if grad_scaler else "interleaved",
        "contender": "interleaved", "device": device, **_env.device_info(device), "versions": _env.versions(),
        "bytes": None, "medians_s": medians,
        "state_bytes_by_contender": {name: state_bytes(o) for name, (o, _, _) in made.items()},
        "n_tensors": len(SHAPES)})


# ---- report (python bench/bench_amos.py RESULTS.json [--out BENCHMARKS.md]) -------------------------

BASELINE = "adamw-foreach"


def markdown(path, command):
    with open(path) as f:
        data = json.load(f)
    rows = [b for b in data["benchmarks"] if b.get("extra_info", {}).get("op") == OP]
    interleaved = [r for r in rows if r["extra_info"]["mode"].startswith("interleaved")]
    rows = [r for r in rows if not r["extra_info"]["mode"].startswith("interleaved")]
    if not rows:
        raise SystemExit(f"no {OP} benchmarks in {path}")
    info = rows[0]["extra_info"]
    threads = info.get("threads") or {}
    out = [f"<!-- bench:{OP}:begin -->", f"## {OP}", "",
           (f"- Device: {info['device']}: {info['device_name']}, {threads.get('torch')} torch / "
            f"{threads.get('numba')} numba threads"),
           "- Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
           f"- Date: {data.get('datetime', '?')}, command: `{command}`",
           (f"- One optimiser step over {info['n_tensors']} fp32 tensors, {N_PARAMS:,} parameters "
            "(20 x [1024, 4096], 4 x [2048, 2048], 40 x [1024]); median of "
            f"{rows[0]['stats']['rounds']} steps after 2 warm-up steps. GB/s = compulsory bytes / median. "
            f"Speed-up = {BASELINE} median / contender median, same run."), ""]
    for device in sorted({r["extra_info"]["device"] for r in rows}):
        case = [r for r in rows if r["extra_info"]["device"] == device]
        medians = {r["extra_info"]["contender"]: r["stats"]["median"] for r in case}
        out += [f"### {device}", "", f"| contender | median ms | GB/s | state MB | vs {BASELINE} |",
                "|---|---:|---:|---:|---:|"]
        for r in sorted(case, key=lambda r: CONTENDERS.index(r["extra_info"]["contender"])):
            e, median = r["extra_info"], r["stats"]["median"]
            ratio = f"{medians[BASELINE] / median:.2f}x" if BASELINE in medians else "n/a"
            name = f"**{e['contender']}**" if e["contender"].startswith("fastnotes-") else e["contender"]
            out.append(f"| {name} | {median * 1e3:.1f} | {e['bytes'] / median / 1e9:.2f} | "
                       f"{e['state_bytes'] / 1e6:.2f} | {ratio} |")
        out.append("")
    for r in interleaved:
        medians = r["extra_info"]["medians_s"]
        memory = r["extra_info"]["state_bytes_by_contender"]
        how = " through torch.amp.GradScaler (scaler.step + update)" if r["extra_info"]["mode"].endswith("amp") else ""
        out += [(f"Interleaved{how} ({r['stats']['rounds']} rounds, one step of each contender per round, "
                 f"{r['extra_info']['device']}):"), "", f"| contender | median ms | state MB | vs {BASELINE} |",
                "|---|---:|---:|---:|"]
        for name, median in medians.items():
            out.append(f"| {name} | {median * 1e3:.1f} | {memory[name] / 1e6:.2f} | "
                       f"{medians[BASELINE] / median:.2f}x |")
        out.append("")
    out.append(f"<!-- bench:{OP}:end -->")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Markdown table for the Amos benchmark")
    parser.add_argument("results")
    parser.add_argument("--out", help="splice the block into this Markdown file")
    parser.add_argument("--command", default="pytest bench/bench_amos.py --benchmark-json=bench/results/amos.json")
    args = parser.parse_args(argv)
    block = markdown(args.results, args.command)
    if not args.out:
        sys.stdout.write(block)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from report import splice

    with open(args.out) as f:
        text = f.read()
    with open(args.out, "w") as f:
        f.write(splice(text, OP, block))


if __name__ == "__main__":
    main()
