"""A t5-small-shaped random T5 (6 layers, d_model 512, 8 heads of 64, d_ff 2048, 32 buckets,
built from T5Config, nothing downloaded, dropout 0) with fastnotes.integrations.transformers.
apply_to_t5 against transformers' own attention implementations ('eager', 'sdpa',
'flex_attention'), plus relpos_attention alone. One run of this script is one comparison:

    python bench/bench_transformers.py [--threads 1] [--rounds 3] [--quick] [--cases encoder,train,...]
                                       [--json bench/results/transformers.json] [--plot bench/transformers_cpu.png]

Cases (fp32, CPU):
  encoder L     T5EncoderModel forward under no_grad, B = 4, L in {512, 1024, 2048}
  train 1024    T5EncoderModel forward + backward of mean(hidden^2), B = 4 (no optimizer step)
  train-dropout the same with dropout_rate = 0.1 (T5's default: attention, residual and feed-forward
                dropout) in training mode; not in the default --cases
  generate      T5ForConditionalGeneration.generate, B = 1, 512 input tokens, greedy, exactly 64
                new tokens (min_new_tokens = max_new_tokens = 64), KV cache on
  attention     relpos_attention alone, 4 x 8 x 1024 x 64, T5 bias (32 buckets, bidirectional):
                forward vs torch.compile(flex_attention) with the table as score_mod; forward and
                forward + backward vs SDPA with the materialised bias (gathered inside the timed call)
                as [H, L, L] ('sdpa-bias', as bench/bench_attention.py and PERF-NOTES measured it,
                which sends SDPA down its unfused math path) and as [1, H, L, L] ('sdpa-bias4d', the
                shape transformers passes, which torch's fused CPU kernel takes)

Every (contender, case) runs in a fresh subprocess: build the model, one warm-up call (numba's
cache load, torch.compile), then one call inside bench/_shared.PeakRss (peak resident memory above
the resident memory just before the call, heap handed back first: the extra memory that call
needed, gradients included), then `repeats` timed calls: wall time (fastest and median) and the
process CPU time of the fastest. With --threads 1 the CPU time is the work itself even when other
jobs share the cores (the wall times are not). Contenders that cannot run a
case report why (e.g. FlexAttention has no CPU backward in torch 2.13). The machine is shared:
quote ratios within one run, with the `uptime` load printed at the start and end. With --rounds N
every (contender, case) runs in N fresh subprocesses, the contenders of a case alternating (A B A B
...), so that a change of load between subprocesses does not favour one of them.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

BATCH, LAYERS, D_MODEL, HEADS, D_KV, D_FF, VOCAB = 4, 6, 512, 8, 64, 2048, 32128
ENCODER_LENGTHS = (512, 1024, 2048)
TRAIN_LENGTH = 1024
TRAIN_DROPOUT = 0.1  # the train-dropout case: T5's default dropout_rate (attention, residual, feed-forward)
GEN_BATCH, GEN_INPUT, GEN_TOKENS = 1, 512, 64
CONTENDERS = ("fastnotes", "eager", "sdpa", "flex_attention")
ATTENTION_CONTENDERS = ("fastnotes-fwd", "flex-fwd", "sdpa-bias-fwd", "sdpa-bias4d-fwd", "fastnotes-fwdbwd",
                        "sdpa-bias-fwdbwd", "sdpa-bias4d-fwdbwd")


def config(dropout_rate=0.0, **extra):
    from transformers import T5Config

    return T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_KV, d_ff=D_FF, num_layers=LAYERS,
                    num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=dropout_rate, feed_forward_proj="relu",
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **extra)


def build(contender, cls_name, dropout_rate=0.0):
    import transformers

    from fastnotes.integrations.transformers import apply_to_t5

    torch.manual_seed(0)
    implementation = "eager" if contender == "fastnotes" else contender
    model = getattr(transformers, cls_name)(config(dropout_rate, attn_implementation=implementation))
    if contender == "fastnotes":
        apply_to_t5(model)
    return model


def ids(batch, length, seed=1):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def case_fn(contender, case, length):
    """A no-argument callable running one call of the case."""
    if case == "attention":
        return attention_fn(contender)
    if case == "generate":
        model = build(contender, "T5ForConditionalGeneration").eval()
        inputs = ids(GEN_BATCH, GEN_INPUT)
        mask = torch.ones_like(inputs)

        def generate():
            with torch.no_grad():
                out = model.generate(input_ids=inputs, attention_mask=mask, max_new_tokens=GEN_TOKENS,
                                     min_new_tokens=GEN_TOKENS, do_sample=False, num_beams=1)
            assert out.shape[1] == GEN_TOKENS + 1, out.shape
        return generate
    model = build(contender, "T5EncoderModel", TRAIN_DROPOUT if case == "train-dropout" else 0.0)
    inputs = ids(BATCH, length)
    if case == "encoder":
        model.eval()

        def forward():
            with torch.no_grad():
                model(input_ids=inputs)
        return forward
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=inputs).last_hidden_state.pow(2).mean().backward()
    return step


def attention_fn(contender):
    """relpos_attention alone vs compiled FlexAttention / SDPA with the materialised bias, T5 table."""
    import torch.nn.functional as F

    import fastnotes
    from fastnotes.reference.attention import relative_distance, table_index

    length, buckets = 1024, (32, 128, True)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, length, D_KV, generator=gen) for _ in range(3))
    table = torch.randn(HEADS, 32, generator=gen) * 0.5
    index = table_index(relative_distance(length, length, "cpu"), 32, buckets)
    name, mode = contender.rsplit("-", 1)
    if name == "fastnotes":
        def op(q, k, v, t):
            return fastnotes.relpos_attention(q, k, v, scale=1.0, rel_bias=t, rel_buckets=buckets)
    elif name == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention)

        def op(q, k, v, t):
            return compiled(q, k, v, score_mod=lambda s, b, h, qi, ki: s + t[h, index[qi, ki]], scale=1.0)
    elif name == "sdpa-bias":  # the [H, L, L] bias as bench/bench_attention.py passes it: torch's math path
        def op(q, k, v, t):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=t[:, index], scale=1.0)
    else:  # [1, H, L, L], as transformers passes T5's bias: torch's fused CPU kernel takes it
        def op(q, k, v, t):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=t[:, index][None], scale=1.0)
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                op(q, k, v, table)
        return forward
    leaves = [x.detach().requires_grad_() for x in (q, k, v, table)]

    def forward_backward():
        torch.autograd.grad(op(*leaves).sum(), leaves)
    return forward_backward


def run_one(contender, case, length, repeats, threads):
    """In the subprocess: warm-up, the peak-memory call, the timed calls; a JSON line on stdout."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _shared import PeakRss

    if threads:
        import numba

        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
    fn = case_fn(contender, case, length)
    start = time.perf_counter()
    fn()
    warm_s = time.perf_counter() - start
    with PeakRss() as rss:
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "cpu_min_s": min(cpu), "cpu_s": cpu, "warmup_s": warm_s, "peak_extra_bytes": rss.peak - rss.before}


def subprocess_one(contender, case, length, repeats, timeout, threads):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, os.path.abspath(__file__), "one", contender, case, str(length), str(repeats),
               str(threads)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if result.returncode != 0:  # the last exception line of the traceback
        lines = [line.strip() for line in result.stderr.splitlines()
                 if re.match(r"^[\w.]+(Error|Exception|Unsupported)\b.*:", line.strip())]
        return {"error": lines[-1][:160] if lines else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def plan(quick, cases):
    """[(case, length, contenders, repeats)] in the order they run."""
    rows = []
    if "attention" in cases:
        rows.append(("attention", 1024, ATTENTION_CONTENDERS, 3 if quick else 5))
    if "encoder" in cases:
        for length in ENCODER_LENGTHS[:2] if quick else ENCODER_LENGTHS:
            rows.append(("encoder", length, CONTENDERS, 2 if length >= 2048 or quick else 3))
    if "train" in cases:
        rows.append(("train", TRAIN_LENGTH, CONTENDERS, 2 if quick else 3))
    if "train-dropout" in cases:
        rows.append(("train-dropout", TRAIN_LENGTH, CONTENDERS, 2 if quick else 3))
    if "generate" in cases:
        rows.append(("generate", GEN_INPUT, CONTENDERS, 2 if quick else 3))
    return rows


def merge_rounds(runs):
    """One row per (case, length, contender): times over every round's timed calls, the peak
    memory as the median of the rounds' peaks; an error if every round failed."""
    merged = {}
    for row in runs:
        merged.setdefault((row["case"], row["length"], row["contender"]), []).append(row)
    results = []
    for (case, length, contender), rows in merged.items():
        good = [r for r in rows if "median_s" in r]
        result = {"case": case, "length": length, "contender": contender, "rounds": len(rows)}
        if not good:
            result["error"] = rows[0]["error"]
        else:
            times = [t for r in good for t in r["times_s"]]
            result.update(median_s=statistics.median(times), min_s=min(times), times_s=times,
                          cpu_min_s=min(r["cpu_min_s"] for r in good), cpu_s=[t for r in good for t in r["cpu_s"]],
                          warmup_s=min(r["warmup_s"] for r in good),
                          peak_extra_bytes=statistics.median(r["peak_extra_bytes"] for r in good),
                          peaks_bytes=[r["peak_extra_bytes"] for r in good])
        results.append(result)
    return results


def load():
    return os.getloadavg()


def _ms(r, key):
    return f"{r[key] * 1e3:.0f}" if key in r else "n/a"


def _ratio(r, base, key):
    return f"{base[key] / r[key]:.2f}x" if key in r and key in base else ""


def markdown(results, meta):
    """Time ratios (> 1: faster than sdpa) from the fastest timed call (wall) and from its process CPU
    time (the work itself when every subprocess runs one thread, whatever else the machine runs)."""
    lines = [f"Command: `{meta['command']}`; {meta['started']} to {meta['finished']} UTC; load average "
             f"{meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after; {meta['cpu']}; "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f"; threads {meta['threads']}.", ""]
    lines += ["| case | contender | wall ms (min) | wall ms (median) | CPU ms | speed-up vs sdpa (wall / CPU) "
              "| peak extra MiB | memory vs sdpa |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {(r["case"], r["length"], r["contender"]): r for r in results}
    for r in results:
        if r["case"] == "attention":
            continue
        base = by.get((r["case"], r["length"], "sdpa"), {})
        memory = (f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}" if "peak_extra_bytes" in r
                  and base.get("peak_extra_bytes") else "")
        label = {"encoder": f"encoder fwd B={BATCH} L={r['length']}", "train": f"train step B={BATCH} L={r['length']}",
                 "train-dropout": f"train step, dropout {TRAIN_DROPOUT}, B={BATCH} L={r['length']}",
                 "generate": f"generate B={GEN_BATCH} {GEN_INPUT}->{GEN_TOKENS}"}[r["case"]]
        note = f" (failed: {r['error']})" if "error" in r else ""
        mib = f"{r['peak_extra_bytes'] / 2**20:.0f}" if "peak_extra_bytes" in r else "n/a"
        speed = f"{_ratio(r, base, 'min_s')} / {_ratio(r, base, 'cpu_min_s')}" if "min_s" in r else ""
        lines.append(f"| {label} | {r['contender']}{note} | {_ms(r, 'min_s')} | {_ms(r, 'median_s')} | "
                     f"{_ms(r, 'cpu_min_s')} | {speed} | {mib} | {memory} |")
    attention = [r for r in results if r["case"] == "attention"]
    if attention:
        get = {r["contender"]: r for r in attention}
        lines += ["", f"relpos_attention alone, {BATCH} x {HEADS} x 1024 x {D_KV}, T5 bias, fp32:", "",
                  "| contender | wall ms (min) | wall ms (median) | CPU ms | peak extra MiB |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['contender']}{' (failed: ' + r['error'] + ')' if 'error' in r else ''} | {_ms(r, 'min_s')} | "
                  f"{_ms(r, 'median_s')} | {_ms(r, 'cpu_min_s')} | "
                  f"{r['peak_extra_bytes'] / 2**20 if 'peak_extra_bytes' in r else float('nan'):.0f} |"
                  for r in attention]
        pairs = (("fastnotes-fwd", "flex-fwd"), ("fastnotes-fwd", "sdpa-bias-fwd"), ("fastnotes-fwd", "sdpa-bias4d-fwd"),
                 ("fastnotes-fwdbwd", "sdpa-bias-fwdbwd"), ("fastnotes-fwdbwd", "sdpa-bias4d-fwdbwd"))
        ratios = [f"{b} / {a} = {_ratio(get[a], get[b], 'min_s')} wall, {_ratio(get[a], get[b], 'cpu_min_s')} CPU"
                  for a, b in pairs if "min_s" in get.get(a, {}) and "min_s" in get.get(b, {})]
        lines += ["", "Time ratios (> 1: fastnotes faster): " + "; ".join(ratios) + "."]
    return "\n".join(lines) + "\n"


def plot(results, path, key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_rows = [r for r in results if r["case"] != "attention"]
    groups = list(dict.fromkeys((r["case"], r["length"]) for r in model_rows))
    colors = dict(zip(CONTENDERS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=120)
    width = 0.8 / len(CONTENDERS)
    titles = {"encoder": "enc fwd L={}", "train": "train L={}", "train-dropout": "train+dropout L={}",
              "generate": "generate {}->64"}
    time_label = {"cpu_min_s": "CPU time of the call (s, log)", "min_s": "fastest call, wall (s, log)"}[key]
    for ax, field, ylabel in ((axes[0], key, time_label),
                              (axes[1], "peak_extra_bytes", "peak extra resident memory (MiB, log)")):
        for i, group in enumerate(groups):
            for j, contender in enumerate(CONTENDERS):
                r = next((r for r in model_rows if (r["case"], r["length"]) == group and r["contender"] == contender),
                         None)
                if r is None or field not in r:
                    continue
                value = r[field] if field != "peak_extra_bytes" else r[field] / 2**20
                ax.bar(i - 0.4 + width * (j + 0.5), value, width, color=colors[contender],
                       label=contender if contender not in ax.get_legend_handles_labels()[1] else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([titles[c].format(length) for c, length in groups], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(CONTENDERS), frameon=False, fontsize=8)
    fig.suptitle("t5-small-shaped random T5, CPU fp32: apply_to_t5 ('fastnotes') vs transformers' attention "
                 "(lower is better; missing bar: the contender failed)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, encoder L <= 1024")
    parser.add_argument("--cases", default="attention,encoder,train,generate")
    parser.add_argument("--contenders", default=",".join(CONTENDERS + ATTENTION_CONTENDERS))
    parser.add_argument("--json", default="bench/results/transformers.json")
    parser.add_argument("--plot", default="bench/transformers_cpu.png")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per (contender, case) subprocess")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh subprocesses per (case, contender), contenders alternating: times over all, "
                             "memory the median of the rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and numba threads in every subprocess (0: their defaults, the core count); "
                             "with 1, process CPU time measures the work even on a busy machine")
    args = parser.parse_args(argv)
    import transformers

    from fastnotes import _env

    wanted = set(args.contenders.split(","))
    meta = {"command": "python bench/bench_transformers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": time.strftime("%H:%M", time.gmtime()), "load_before": load(),
            "versions": {**_env.versions(), "transformers": transformers.__version__},
            "threads": args.threads or _env.device_info("cpu")["threads"], "cpu": _env.cpu_name()}
    runs = []
    for case, length, contenders, repeats in plan(args.quick, set(args.cases.split(","))):
        contenders = [c for c in contenders if c in wanted]
        for round_ in range(args.rounds):  # contenders alternate, so load drift hits them alike
            for contender in contenders:
                row = {"case": case, "length": length, "contender": contender, "round": round_}
                row.update(subprocess_one(contender, case, length, repeats, args.timeout, args.threads))
                runs.append(row)
                shown = (f"min {row['min_s'] * 1e3:9.1f} ms  cpu {row['cpu_min_s'] * 1e3:9.1f} ms  "
                         f"peak +{row['peak_extra_bytes'] / 2**20:7.1f} MiB" if "median_s" in row else row["error"])
                print(f"{case:9} {length:5} {contender:18} {shown}  (round {round_ + 1}, load {load()[0]:.2f})",
                      flush=True)
    results = merge_rounds(runs)
    meta.update(finished=time.strftime("%H:%M", time.gmtime()), load_after=load())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    print()
    print(markdown(results, meta))
    if args.plot and any(r["case"] != "attention" and "median_s" in r for r in results):
        plot(results, args.plot, "cpu_min_s" if args.threads == 1 else "min_s")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        print(json.dumps(run_one(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))))
    else:
        main()
