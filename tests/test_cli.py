"""`python -m fastnotes` reports every check and exits 0 only when all pass."""
import json
import subprocess
import sys


def test_main_json_reports_passing_checks():
    out = subprocess.run([sys.executable, "-m", "fastnotes", "--json", "--no-bench"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["passed"] is True
    ops = {(row["op"], row["backend"]) for row in report["checks"]}
    assert ("multilabel_ce", "reference") in ops
    if report["backends"]["numba"] == "available":
        assert ("multilabel_ce", "numba") in ops
    assert all(row["passed"] for row in report["checks"])
    assert report["versions"]["torch"]


def test_main_fails_on_a_failing_check(monkeypatch, capsys):
    from fastnotes import __main__ as cli
    from fastnotes import _selfcheck

    def broken(device, dtype):
        return {"value_error": 1.0, "grad_error": 0.0}

    monkeypatch.setattr(_selfcheck, "OPS", {"multilabel_ce": (broken, None)})
    assert cli.main(["--no-bench"]) == 1
    assert "SOME CHECKS FAILED" in capsys.readouterr().out
