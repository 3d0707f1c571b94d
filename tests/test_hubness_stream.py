"""The streamed (out-of-core) k-NN / k-occurrence of fastnotes/hubness/stream.py: a .npy path or a
numpy.memmap read in row blocks gives the in-memory op's lists, distances and counts exactly; the
blocks stay within their sizes; the CLI streams a file; bad input raises naming the argument."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastnotes import _registry, hubness

METRICS = ("sqeuclidean", "cosine", "ip")


def _data(dtype, n=150, d=7, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)
    x[4] = 0.0  # a zero row (cosine's special case)
    x[9] = x[2]  # a duplicate (distance-0 tie)
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_npy_path_equals_in_memory(tmp_path, dtype, metric):
    x = _data(dtype)
    path = tmp_path / "x.npy"
    np.save(path, x)
    t = torch.from_numpy(x)
    distances, indices = hubness.knn(t, 6, metric=metric)
    # 37 and 53 divide neither n = 150 nor each other: partial query blocks and reference tiles
    got_d, got_i = hubness.knn(str(path), 6, metric=metric, block_rows=37, ref_rows=53)
    assert got_d.dtype == distances.dtype and got_i.dtype == torch.int64
    assert torch.equal(got_i, indices) and torch.equal(got_d, distances)
    counts = hubness.k_occurrence(t, 6, metric=metric)
    got = hubness.k_occurrence(path, 6, metric=metric, block_rows=37, ref_rows=53)  # a PathLike
    assert torch.equal(got, counts) and int(got.sum()) == 6 * len(x)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_memmap_with_ties_and_offset(tmp_path, exclude_self):
    """Integer data (large groups of ties: the float64 fallback search runs with global row indices)
    and offset data, from memmaps written in place."""
    rng = np.random.default_rng(1)
    for values in (rng.integers(0, 3, (130, 4)), 100 + 0.1 * rng.standard_normal((130, 5))):
        x = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=values.shape)
        x[:] = values
        x.flush()
        x = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=values.shape)
        t = torch.tensor(np.asarray(x))
        for metric in METRICS:
            expected = hubness.knn(t, 5, metric=metric, exclude_self=exclude_self)
            got = hubness.knn(x, 5, metric=metric, exclude_self=exclude_self, block_rows=29, ref_rows=31)
            assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), metric
            assert torch.equal(hubness.k_occurrence(x, 5, metric=metric, exclude_self=exclude_self, block_rows=64),
                               hubness.k_occurrence(t, 5, metric=metric, exclude_self=exclude_self))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_set_streamed(tmp_path, dtype):
    x, ref = _data(dtype, n=90, seed=2), _data(dtype, n=70, seed=3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "r.npy", ref)
    for metric in METRICS:
        expected = hubness.knn(torch.from_numpy(x), 4, reference=torch.from_numpy(ref), metric=metric)
        got = hubness.knn(str(tmp_path / "x.npy"), 4, reference=str(tmp_path / "r.npy"), metric=metric,
                          block_rows=20, ref_rows=33)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0]), metric
        # a file against an in-memory reference tensor
        counts = hubness.k_occurrence(tmp_path / "x.npy", 4, reference=torch.from_numpy(ref), metric=metric,
                                      block_rows=20)
        assert torch.equal(counts, hubness.k_occurrence(torch.from_numpy(x), 4, reference=torch.from_numpy(ref),
                                                        metric=metric))
        assert counts.shape == (70,)


def test_blocks_stay_within_their_sizes(tmp_path, monkeypatch):
    """The kernels see at most block_rows queries and ref_rows references per call (bounded memory)."""
    x = _data(np.float32, n=200)
    np.save(tmp_path / "x.npy", x)
    kernels = _registry.HUBNESS.kernels("numba")
    original, shapes = kernels.candidates, []

    def recording(xq, ref, *args):
        shapes.append((xq.shape[0], ref.shape[0]))
        return original(xq, ref, *args)

    monkeypatch.setattr(kernels, "candidates", recording)
    import fastnotes

    with fastnotes.use_backend("numba"):
        counts = hubness.k_occurrence(str(tmp_path / "x.npy"), 5, block_rows=64, ref_rows=48)
    assert shapes and max(q for q, _ in shapes) <= 64 and max(r for _, r in shapes) <= 48
    assert sum(r for _, r in shapes) == 200 * 4  # every reference tile once per query block (4 blocks)
    monkeypatch.setattr(kernels, "candidates", original)
    assert torch.equal(counts, hubness.k_occurrence(torch.from_numpy(x), 5))


def test_progress_bar(tmp_path, capsys):
    pytest.importorskip("tqdm")
    np.save(tmp_path / "x.npy", _data(np.float32, n=60))
    hubness.k_occurrence(str(tmp_path / "x.npy"), 3, block_rows=16, progress=True)
    err = capsys.readouterr().err
    assert "k_occurrence" in err and "/60" in err
    hubness.k_occurrence(str(tmp_path / "x.npy"), 3, block_rows=16, progress=False)
    assert capsys.readouterr().err == ""


def test_cli_streams_and_writes_outputs(tmp_path):
    x = _data(np.float32, n=120)
    path = tmp_path / "x.npy"
    np.save(path, x)
    out_json, out_npy = tmp_path / "stats.json", tmp_path / "counts.npy"
    run = subprocess.run([sys.executable, "-m", "fastnotes", "hubness", str(path), "--k", "5", "--block-rows", "50",
                          "--out", str(out_json), "--out", str(out_npy), "--no-progress"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "streamed from disk" in run.stdout
    counts = hubness.k_occurrence(torch.from_numpy(x), 5)
    stats = hubness.hubness_stats(counts, 5)
    assert f"skewness             {stats['skewness']:.6g}" in run.stdout
    saved = np.load(out_npy)
    assert saved.dtype == np.int64 and np.array_equal(saved, counts.numpy())
    summary = json.loads(out_json.read_text())
    assert (summary["n"], summary["d"], summary["k"]) == (120, 7, 5)
    assert summary["stats"] == pytest.approx(stats, rel=0, abs=0)
    top = torch.argsort(counts, descending=True, stable=True)[:10].tolist()
    assert [h["index"] for h in summary["top_hubs"]] == top


def test_cli_bad_arguments(tmp_path):
    from fastnotes.__main__ import main

    path = tmp_path / "x.npy"
    np.save(path, _data(np.float32, n=10))
    with pytest.raises(SystemExit, match="no such file"):
        main(["hubness", str(tmp_path / "missing.npy")])
    with pytest.raises(SystemExit, match="k must satisfy"):
        main(["hubness", str(path), "--k", "9"])
    with pytest.raises(SystemExit):  # argparse: --out must be .json or .npy
        main(["hubness", str(path), "--out", str(tmp_path / "x.txt")])


def test_bad_input_names_the_argument(tmp_path):
    good = tmp_path / "x.npy"
    np.save(good, _data(np.float32, n=20))
    np.save(tmp_path / "flat.npy", np.zeros(20, dtype=np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((20, 3), dtype=np.int64))
    np.save(tmp_path / "wide.npy", np.zeros((20, 9), dtype=np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((20, 7), dtype=np.float64))
    nan = _data(np.float32, n=20)
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases = [
        (lambda: hubness.k_occurrence(str(tmp_path / "flat.npy"), 3), ValueError, r"x must be \[n, d\]"),
        (lambda: hubness.knn(str(good), 3, reference=str(tmp_path / "flat.npy")), ValueError,
         r"reference must be \[n, d\]"),
        (lambda: hubness.knn(str(tmp_path / "nope.npy"), 3), FileNotFoundError, "x: no such file"),
        (lambda: hubness.knn(str(good), 3, reference=str(tmp_path / "nope.npy")), FileNotFoundError,
         "reference: no such file"),
        (lambda: hubness.k_occurrence(str(good), 19), ValueError, "k must satisfy 1 <= k < 19"),
        (lambda: hubness.k_occurrence(str(good), 0), ValueError, "k must satisfy"),
        (lambda: hubness.k_occurrence(str(tmp_path / "ints.npy"), 3), TypeError, "x must hold float32 or float64"),
        (lambda: hubness.knn(str(good), 3, reference=str(tmp_path / "wide.npy")), ValueError,
         r"reference must be \[m, 7\]"),
        (lambda: hubness.knn(str(good), 3, reference=str(tmp_path / "f64.npy")), TypeError,
         "reference has dtype torch.float64"),
        (lambda: hubness.k_occurrence(str(tmp_path / "nan.npy"), 3), ValueError, "x contains NaN or infinite"),
        (lambda: hubness.knn(str(good), 3, reference=str(tmp_path / "nan.npy")), ValueError,
         "reference contains NaN"),
        (lambda: hubness.knn(str(tmp_path / "nan.npy"), 3, reference=str(good)), ValueError, "x contains NaN"),
        (lambda: hubness.k_occurrence(str(good), 3, block_rows=0), ValueError, "block_rows must be a positive int"),
        (lambda: hubness.k_occurrence(str(good), 3, ref_rows=2.5), ValueError, "ref_rows must be a positive int"),
        (lambda: hubness.k_occurrence(torch.zeros(20, 3), 3, block_rows=8), TypeError, "block_rows applies"),
        (lambda: hubness.k_occurrence(str(good), 3, metric="euclidean"), ValueError, "metric must be one of"),
        (lambda: hubness.k_occurrence(str(good), 3, progress="yes"), TypeError, "progress must be"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
