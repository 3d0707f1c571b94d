"""Self-check and quick timing of every op, for `python -m fastnotes`.

Each op family has one module here whose CASES dict maps an op name to (check, timing):
check(device, dtype) runs the fused backend against the float64 reference on fresh random inputs,
forward and backward, and returns {"value_error", "grad_error"}; timing(device) returns the fused
call and the composite users would write. Modules are found by name, so a new op family only adds
its own file."""
import importlib
import pkgutil
import time

import torch

from .. import _dispatch

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}

# Families first in the order they were built, then any others by name.
_FIRST = ("zlpr", "exact", "diffusion")


def _collect_cases():
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))
    cases = {}
    for name in names:
        cases.update(importlib.import_module(f"{__name__}.{name}").CASES)
    return cases


OPS = _collect_cases()


def backends_for(device_type):
    return [b for b in ("cuda", "triton", "numba") if _dispatch.availability(b, device_type) is None]


def run_checks(device):
    """One row per (op, backend, dtype): errors vs the float64 reference and pass/fail."""
    rows = []
    for op, (check, _) in OPS.items():
        for backend in backends_for(device.type) + ["reference"]:
            for dtype in (torch.float32, torch.float64):
                row = {"op": op, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
                with _dispatch.use_backend(backend):
                    try:
                        row.update(check(device, dtype))
                    except _dispatch.BackendUnsupportedError:
                        continue  # e.g. triton has no float64 path
                    except Exception as exc:  # a crash is a failed check, reported, not raised
                        row.update(error=f"{type(exc).__name__}: {exc}")
                tol = TOLERANCE[dtype]
                row["tolerance"] = tol
                row["passed"] = "error" not in row and row["value_error"] <= tol and row["grad_error"] <= tol
                rows.append(row)
    return rows


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_timings(device, repeats=5):
    rows = []
    for op, (_, timing) in OPS.items():
        case = timing(device)
        fused = _median_ms(case["fused"], repeats)
        composite = _median_ms(case["composite"], repeats)
        rows.append({"op": op, "case": case["shape"], "fused_ms": fused, "composite_ms": composite,
                     "speedup": composite / fused})
    return rows
