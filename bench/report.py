"""Turn a pytest-benchmark JSON file into Markdown tables (and a bar plot), one section per op.

    python bench/report.py RESULTS.json [--out BENCHMARKS.md] [--plot bench/zlpr.png]

Benchmarks are grouped by extra_info["op"]; each op gets one Markdown block per run, fenced by
<!-- bench:OP:begin --> / <!-- bench:OP:end -->. With --out, only those blocks are replaced (or
appended when absent): text around them and other ops' blocks are kept. Without --out the Markdown
goes to stdout. Within an op there is one table per (device, shape, mode): median time, GB/s of
compulsory traffic (extra_info["bytes"] / median), and for fastnotes contenders the speed-up over each
baseline measured in the same run.
"""
import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from datetime import datetime

BASELINES = ("eager-composite", "torch-compile", "bce-with-logits", "diffusers-ddpm", "diffusers-ddim", "faiss-cpu",
             "sklearn-brute", "torch-cdist-topk", "sdpa-no-bias", "adamw-foreach", "adamw-fused", "cross-entropy",
             "liger-flce")
MODE_LABELS = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
DEFAULT_COMMAND = "make bench"


def load(path):
    with open(path) as f:
        data = json.load(f)
    by_op = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        by_op[info["op"]].append({
            "op": info["op"],
            "device": info.get("device", "cpu"),
            "device_name": info.get("device_name", "?"),
            "threads": info.get("threads"),
            "versions": info.get("versions", {}),
            "shape": tuple(info["shape"]),
            "mode": info["mode"],
            "contender": info["contender"],
            "bytes": info.get("bytes"),
            "saved_bytes": info.get("saved_bytes"),
            # peak memory of one call above what was allocated before it (GPU suites), when recorded
            "peak_bytes": info.get("peak_extra_bytes", info.get("peak_memory_bytes")),
            "median_s": bench["stats"]["median"],
            "rounds": bench["stats"]["rounds"],
        })
    return data, dict(by_op)


def _contender_key(name):
    # fastnotes first, then the baselines in their fixed order, then anything else
    if name.startswith("fastnotes-"):
        return (0, name)
    return (1, BASELINES.index(name)) if name in BASELINES else (2, name)


def _case_key(case):
    device, shape, mode = case
    return (device != "cpu", device, shape[::-1], list(MODE_LABELS).index(mode) if mode in MODE_LABELS else 9)


def cases(rows):
    """{(device, shape, mode): [row, ...] sorted by contender}, in display order."""
    grouped = defaultdict(list)
    for row in rows:
        grouped[(row["device"], row["shape"], row["mode"])].append(row)
    return {k: sorted(grouped[k], key=lambda r: _contender_key(r["contender"]))
            for k in sorted(grouped, key=_case_key)}


def case_title(case):
    device, shape, mode = case
    return f"{device} · {' x '.join(str(d) for d in shape)} · {MODE_LABELS.get(mode, mode)}"


def _fmt_ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _run_date(data):
    try:
        return datetime.fromisoformat(data["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, ValueError):
        return data.get("datetime", "?")


def _header(rows, data, command):
    lines = []
    devices = {}
    for row in rows:
        threads = row["threads"]
        extra = ""
        if isinstance(threads, dict):
            extra = f", {threads.get('torch')} torch / {threads.get('numba')} numba threads"
        devices.setdefault(row["device"], f"{row['device']}: {row['device_name']}{extra}")
    versions = rows[0]["versions"]
    commit = data.get("commit_info") or {}
    commit_id = (commit.get("id") or "")[:10]
    if commit_id and commit.get("dirty"):
        commit_id += " (dirty)"
    rounds = sorted({row["rounds"] for row in rows})
    lines.append(f"- Device: {'; '.join(devices.values())}")
    lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"- Date: {_run_date(data)}" + (f", commit {commit_id}" if commit_id else ""))
    lines.append(f"- Command: `{command}`")
    lines.append(f"- Median of {rounds[0]}-{rounds[-1]} rounds (1 warm-up each, compilation excluded). "
                 "GB/s = compulsory bytes / median. Speed-up = baseline median / fastnotes median, same run.")
    return lines


def markdown_section(op, rows, data, command, plot_rel=None):
    out = [f"<!-- bench:{op}:begin -->", f"## {op}", ""]
    out += _header(rows, data, command)
    if plot_rel:
        out += ["", f"![{op} benchmark]({plot_rel})"]
    for case, case_rows in cases(rows).items():
        medians = {r["contender"]: r["median_s"] for r in case_rows}
        baselines = [b for b in BASELINES if b in medians]
        # memory saved for backward (counted with saved-tensor hooks), when the suite records it
        saved = any(r["saved_bytes"] is not None for r in case_rows)
        peak = any(r["peak_bytes"] is not None for r in case_rows)
        # bandwidth against a copy of the same tensors measured in the same run, when the suite has one
        copy = next((r for r in case_rows if r["contender"] == "copy" and r["bytes"]), None)
        out += ["", f"### {case_title(case)}", ""]
        out.append("| contender | median ms | GB/s | " + ("% of copy GB/s | " if copy else "")
                   + ("saved for bwd MB | " if saved else "") + ("peak MB | " if peak else "")
                   + " | ".join(f"vs {b}" for b in baselines) + " |")
        out.append("|---|---:|---:|" + ("---:|" if copy else "") + ("---:|" if saved else "") + ("---:|" if peak else "")
                   + "---:|" * len(baselines))
        for r in case_rows:
            gbs = f"{r['bytes'] / r['median_s'] / 1e9:.2f}" if r["bytes"] else "n/a"
            if copy:
                share = (r["bytes"] / r["median_s"]) / (copy["bytes"] / copy["median_s"]) if r["bytes"] else None
                gbs += f" | {100 * share:.0f}%" if share is not None else " | "
            if saved:
                gbs += f" | {r['saved_bytes'] / 1e6:.2f}" if r["saved_bytes"] is not None else " | "
            if peak:
                gbs += f" | {r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else " | "
            name = r["contender"]
            if name.startswith("fastnotes-"):
                speedups = [f"{medians[b] / r['median_s']:.2f}x" for b in baselines]
                name = f"**{name}**"
            else:
                speedups = ["" for _ in baselines]
            out.append(f"| {name} | {_fmt_ms(r['median_s'])} | {gbs} | " + " | ".join(speedups) + " |")
    out += ["", f"<!-- bench:{op}:end -->"]
    return "\n".join(out) + "\n"


def plot(op, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = cases(rows)
    contenders = sorted({r["contender"] for r in rows}, key=_contender_key)
    colors = dict(zip(contenders, plt.get_cmap("tab10").colors))
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(grouped)), 4.6), dpi=120)
    for i, case_rows in enumerate(grouped.values()):
        present = case_rows
        offset = -0.4 + width / 2 + (len(contenders) - len(present)) * width / 2  # centre what ran
        for j, r in enumerate(present):
            ms = r["median_s"] * 1e3
            ax.bar(i + offset + j * width, ms, width, color=colors[r["contender"]],
                   label=r["contender"] if r["contender"] not in ax.get_legend_handles_labels()[1] else None)
            ax.annotate(_fmt_ms(r["median_s"]), (i + offset + j * width, ms), ha="center", va="bottom",
                        fontsize=6.5, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(grouped)))
    ax.set_xticklabels([case_title(c).replace(" · ", "\n", 1) for c in grouped], fontsize=8)
    ax.set_ylabel("median time per call (ms, log scale)")
    device_names = "; ".join(sorted({f"{r['device']}: {r['device_name']}" for r in rows}))
    ax.set_title(f"{op}: lower is better ({device_names})", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    # bars on a log axis start at the bottom edge: put it a whole decade under the fastest bar so
    # bar heights stay comparable, and leave room above for the value labels
    fastest, slowest = (f(r["median_s"] * 1e3 for r in rows) for f in (min, max))
    ax.set_ylim(10 ** math.floor(math.log10(fastest) - 0.3), slowest * 4)
    ax.legend(fontsize=8, ncol=len(contenders), loc="upper center", bbox_to_anchor=(0.5, -0.16),
              frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def splice(text, op, block):
    """Replace the op's marked block in text, or append it."""
    name = re.escape(op)
    pattern = re.compile(rf"<!-- bench:{name}:begin -->.*?<!-- bench:{name}:end -->\n?", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + block


def _plot_paths(base, ops):
    if base is None:
        return {}
    if len(ops) == 1:
        return {ops[0]: base}
    stem, ext = os.path.splitext(base)
    return {op: f"{stem}_{op}{ext or '.png'}" for op in ops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", help="Markdown file to update in place (stdout when omitted)")
    parser.add_argument("--plot", help="PNG path; with several ops, _OP is added before the extension")
    parser.add_argument("--command", default=DEFAULT_COMMAND, help="command recorded in the header")
    args = parser.parse_args(argv)

    data, by_op = load(args.results)
    if not by_op:
        sys.exit(f"{args.results}: no benchmark has extra_info['op']")
    plots = _plot_paths(args.plot, sorted(by_op))
    blocks = {}
    for op, rows in sorted(by_op.items()):
        plot_rel = None
        if op in plots:
            plot(op, rows, plots[op])
            anchor = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
            plot_rel = os.path.relpath(os.path.abspath(plots[op]), anchor)
        blocks[op] = markdown_section(op, rows, data, args.command, plot_rel)

    if not args.out:
        sys.stdout.write("\n".join(blocks.values()))
        return
    text = open(args.out).read() if os.path.exists(args.out) else "# Benchmarks\n"
    for op, block in blocks.items():
        text = splice(text, op, block)
    with open(args.out, "w") as f:
        f.write(text)
    plots_note = f"; plots: {', '.join(plots.values())}" if plots else ""
    print(f"wrote {', '.join(blocks)} to {args.out}{plots_note}")


if __name__ == "__main__":
    main()
