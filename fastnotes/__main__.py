"""`python -m fastnotes`: environment report, self-check of every op, quick timing table.
Exits non-zero when a check fails. `--json` prints one machine-readable object instead."""
import argparse
import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "hubness":  # python -m fastnotes hubness FILE.npy ... (fastnotes/hubness/cli.py)
        from .hubness.cli import main as hubness_main

        return hubness_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fastnotes", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-bench", action="store_true", help="skip the quick timing table")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    import torch

    import fastnotes
    from fastnotes import _dispatch, _env, _selfcheck

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = {
        "fastnotes": fastnotes.__version__,
        "versions": _env.versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _env.cpu_name(),
        "threads": torch.get_num_threads(),
        "forced_backend": _dispatch.forced_backend(),
        "backends": {b: _dispatch.availability(b, device.type) or "available" for b in fastnotes.BACKENDS},
        "cuda_extension": _dispatch.availability("cuda", "cuda") is None,
        "checks": _selfcheck.run_checks(device),
    }
    if not args.no_bench:
        report["timings"] = _selfcheck.run_timings(device)
    ok = all(row["passed"] for row in report["checks"])
    report["passed"] = ok

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, device)
    return 0 if ok else 1


def _print_report(report, device):
    print(f"fastnotes {report['fastnotes']} on {device.type}: {report['device']} ({report['threads']} threads)")
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()))
    if report["forced_backend"]:
        print(f"backend forced to {report['forced_backend']!r} (use_backend / FASTNOTES_BACKEND)")
    print("\nbackends:")
    for name, status in report["backends"].items():
        print(f"  {name:10s} {status}")
    print(f"  (CUDA C++ extension fastnotes._C: {'built' if report['cuda_extension'] else 'not built'})")
    width = max(len(row["op"]) for row in report["checks"] + report.get("timings", []))
    print("\nself-check (fused vs float64 reference, random inputs, forward and backward):")
    print(f"  {'op':{width}s} {'backend':10s} {'dtype':8s} {'value err':>10s} {'grad err':>10s} {'tol':>8s}  result")
    for row in report["checks"]:
        if "error" in row:
            print(f"  {row['op']:{width}s} {row['backend']:10s} {row['dtype']:8s} FAILED: {row['error']}")
            continue
        print(f"  {row['op']:{width}s} {row['backend']:10s} {row['dtype']:8s} {row['value_error']:10.2e} "
              f"{row['grad_error']:10.2e} {row['tolerance']:8.0e}  {'pass' if row['passed'] else 'FAIL'}")
    if "timings" in report:
        print("\nquick timing (median of 5; auto-selected backend vs the eager composite):")
        case_width = max(len(row["case"]) for row in report["timings"])
        for row in report["timings"]:
            print(f"  {row['op']:{width}s} {row['case']:{case_width}s} fused {row['fused_ms']:8.2f} ms   "
                  f"composite {row['composite_ms']:8.2f} ms   x{row['speedup']:.1f}")
    print("\nall checks passed" if report["passed"] else "\nSOME CHECKS FAILED")


if __name__ == "__main__":
    sys.exit(main())
