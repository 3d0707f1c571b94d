"""Out-of-core k-NN and k-occurrence: an [n, d] set read from a `.npy` file or a numpy.memmap in row
blocks, with memory bounded by the block sizes (docs/hubness.md; knn / k_occurrence call this when
given a path or a memmap).

The pipeline is the in-memory one (fastnotes/hubness/_exact.py) cut into blocks:
- a streaming pre-pass over the reference (the same file for one set) gives mu (_exact._centre's
  float64 sums, tile by tile), the centred norms (hence `add` and the certification bound) and the
  zero rows; a pass over the queries checks for NaN / infinity;
- for each block of queries, each tile of references is centred (_exact._shifted) and fed to the
  backend's `candidates`; the per-tile candidates merge into each row's best by (v, global index).
  The kernels know self-exclusion only for the whole set, so one candidate more is kept and query i
  then drops reference i (or its last candidate);
- refine: the candidates' distances are recomputed directly in float64 from the mapped file, and rows
  the bound cannot certify are searched again over the whole reference (read tile by tile).
So the lists are those of the in-memory op: the exact k nearest under (distance rounded to the output
dtype, index), up to near-ties within float64 rounding, as there.

Memory: O(block_rows * (d + k) + ref_rows * d + m) plus the results (distances and indices [n, k] for
knn, counts [m] for k_occurrence); the file itself is only mapped, and the pages read through the map
are dropped from the process (madvise MADV_DONTNEED; they stay in the OS page cache) after each tile
and block, so they do not pile up in its resident set either.
"""
import mmap
import os
import warnings

import numpy as np
import torch

from .. import _dispatch, _registry
from . import _exact

_STREAM_DTYPES = (np.float32, np.float64)
_BLOCK_BYTES = 1 << 25  # default block: 32 MiB of rows of the file


def is_streamed(x):
    """True for what the streaming path takes: a numpy.memmap or a path (str / os.PathLike)."""
    return isinstance(x, (np.memmap, str, os.PathLike))


def open_rows(op, name, source, maps=None):
    """The [n, d] float32/float64 array behind `source` (a memmap, a path to a `.npy` file opened with
    mmap_mode='r', or a CPU tensor), as a CPU tensor that shares its memory. maps: a list that receives
    the mmap behind a memmap (for release_pages)."""
    if isinstance(source, torch.Tensor):
        if source.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {source.device}; with a streamed (file / memmap) argument "
                             "every argument must be a CPU tensor")
        if source.requires_grad:
            raise ValueError(f"{op}: {name} requires grad; the streamed path computes no gradients")
        if source.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: {name} must be float32 or float64 when streaming, got {source.dtype}")
        if source.dim() != 2:
            raise ValueError(f"{op}: {name} must be [n, d], got shape {tuple(source.shape)}")
        return source.detach().contiguous()
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{op}: {name}: no such file {path!r}")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{op}: {name}: cannot read {path!r} as a .npy array: {error}") from None
        if not isinstance(array, np.ndarray):  # an .npz archive: the file's content is wrong, not a type
            array.close()
            raise ValueError(f"{op}: {name}: {path!r} is not a .npy file holding one array")  # noqa: TRY004
    elif isinstance(source, np.memmap):
        array = source
    else:
        raise TypeError(f"{op}: {name} must be a tensor, a numpy.memmap or a path to a .npy file, "
                        f"got {type(source).__name__}")
    if array.dtype not in _STREAM_DTYPES:
        raise TypeError(f"{op}: {name} must hold float32 or float64 to be streamed, got {array.dtype} "
                        "(convert the file, or load it and pass a tensor)")
    if array.ndim != 2:
        raise ValueError(f"{op}: {name} must be [n, d], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{op}: {name} is empty (shape {array.shape}); it needs at least one row and one column")
    if not array.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (a Fortran-ordered .npy would be read by column)")
    if array.dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        raise TypeError(f"{op}: {name} has non-native byte order {array.dtype}")
    # numpy keeps the mmap of a memmap in _mmap; a copy-on-write map ("c") would lose its changes
    if maps is not None and getattr(array, "_mmap", None) is not None and getattr(array, "mode", "c") != "c":
        maps.append(array._mmap)
    with warnings.catch_warnings():  # a read-only map: torch warns that writes would be undefined; we only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def row_reader(source):
    """For a memmap / .npy path whose array is its file's own map (not a view): a function
    indices -> (the distinct rows among them, read with os.pread into memory, and the indices into
    those). Reading scattered rows through the map would make Linux map the cached pages around each
    (fault-around, up to 64 KiB a row) into the resident set. None for anything else."""
    if isinstance(source, (str, os.PathLike)):
        source = np.load(os.fspath(source), mmap_mode="r", allow_pickle=False)
    if not isinstance(source, np.memmap) or not isinstance(source.base, mmap.mmap) or not source.flags.c_contiguous:
        return None
    path, offset, dtype = source.filename, source.offset, source.dtype
    row_bytes = source.shape[1] * dtype.itemsize

    def read_rows(indices):
        unique, inverse = torch.unique(indices, return_inverse=True)
        rows = np.empty((len(unique), source.shape[1]), dtype=dtype)
        with open(path, "rb") as f:
            for j, r in enumerate(unique.tolist()):
                rows[j] = np.frombuffer(os.pread(f.fileno(), row_bytes, offset + r * row_bytes), dtype=dtype)
        return torch.from_numpy(rows), inverse.view(indices.shape)

    return read_rows


def release_pages(maps):
    """Drop the pages read through these maps from the process's resident set (they stay in the page
    cache; the next read maps them again), so RSS stays bounded by the blocks, not the file."""
    for mapped in maps:
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED") and not mapped.closed:
            mapped.madvise(mmap.MADV_DONTNEED)


def _default_rows(d):
    return int(min(1 << 16, max(256, _BLOCK_BYTES // (8 * d))))


def _check_rows(op, name, value, d):
    if value is None:
        return _default_rows(d)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


def _progress(total, enabled, desc):
    """A tqdm bar over `total` query rows: shown after 3 s for enabled=None when tqdm is installed,
    at once for True (then tqdm is required), never for False."""
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if enabled:
            raise ModuleNotFoundError("progress=True needs tqdm (pip install tqdm)") from None
        return None
    return tqdm(total=total, unit="rows", desc=desc, delay=0 if enabled else 3.0, leave=False)


def _reference_pass(op, name, ref, metric, compute_dtype, rows, maps):
    """Streaming pre-pass over the references: (mu, add [m], norms [m] float64, zero rows or None,
    the largest |value|)."""
    m = ref.shape[0]
    total = spread = None  # _exact._centre, tile by tile so that the pages read can be dropped
    for start in range(0, m, rows):
        total = _exact.column_sum(ref[start:start + rows], metric, total)
        release_pages(maps)
    mean = total / m
    for start in range(0, m, rows):
        spread = _exact.column_spread(ref[start:start + rows], metric, mean, spread)
        release_pages(maps)
    mu = _exact.round_centre(mean, spread)
    norms = torch.empty(m, dtype=torch.float64)
    add = torch.empty(m, dtype=compute_dtype)
    zero = torch.empty(m, dtype=torch.bool) if metric == "cosine" else None
    largest = 0.0
    for start in range(0, m, rows):
        tile = ref[start:start + rows]
        value = float(tile.abs().max())
        if not value < float("inf"):  # NaN too (Python's max would drop it)
            raise ValueError(f"{op}: {name} contains NaN or infinite values")
        largest = max(largest, value)
        rc, norms[start:start + rows] = _exact._shifted(tile, mu, metric, compute_dtype)
        if metric == "ip":
            add[start:start + rows] = (-(rc.double() @ mu)).to(compute_dtype)
        else:
            part = norms[start:start + rows] ** 2
            if zero is not None:
                zero[start:start + rows] = torch.linalg.vector_norm(tile.double(), dim=1) == 0
                part = torch.where(zero[start:start + rows], float("inf"), part)
            add[start:start + rows] = part.to(compute_dtype)
        release_pages(maps)
    return mu, add, norms, zero, largest


def _query_pass(op, x, metric, rows, maps):
    """(zero query rows [n] or None, the largest |value|); raises on NaN / infinity."""
    zero = torch.empty(x.shape[0], dtype=torch.bool) if metric == "cosine" else None
    largest = 0.0
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        value = float(block.abs().max())
        if not value < float("inf"):  # NaN too (Python's max would drop it)
            raise ValueError(f"{op}: x contains NaN or infinite values")
        largest = max(largest, value)
        if zero is not None:
            zero[start:start + rows] = torch.linalg.vector_norm(block.double(), dim=1) == 0
        release_pages(maps)
    return zero, largest


def _candidates(p, kernels, xc, rows, width, add, reference_tiles):
    """Each query row's best `width` references by (v, global index) over all reference tiles; with
    self excluded, one more is searched and reference rows[i] (or the last) dropped."""
    m = p.ref.shape[0]
    drop_self = p.exclude_self
    want = width + 1 if drop_self else width
    best_v = best_i = None
    for start, rc in reference_tiles():
        v, i = kernels.candidates(xc, rc, add[start:start + rc.shape[0]], p.scale, want, False)
        i = torch.where(i >= rc.shape[0], m, i + start)
        if best_v is None:
            best_v, best_i = v, i
        else:
            best_v, best_i = _exact._select(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), want)
    if drop_self:
        own = best_i == rows[:, None]
        own[:, -1] |= ~own.any(1)  # no self among them: drop the last
        keep = ~own
        best_v, best_i = best_v[keep].view(len(rows), width), best_i[keep].view(len(rows), width)
    return best_v, best_i


def run(op, x, k, reference, metric, exclude_self, *, want_lists, block_rows=None, ref_rows=None,
        progress=None):
    """The streamed op: (distances [n, k], indices [n, k]) when want_lists, else counts [m]."""
    from .knn import _check_distance_range, check_options

    maps, original_x = [], x
    x = open_rows(op, "x", x, maps)
    same = reference is None or reference is x
    ref = x if same else open_rows(op, "reference", reference, maps)
    if not same and (ref.shape[1] != x.shape[1]):
        raise ValueError(f"{op}: reference must be [m, {x.shape[1]}] like x, got shape {tuple(ref.shape)}")
    if not same and ref.dtype != x.dtype:
        raise TypeError(f"{op}: reference has dtype {ref.dtype} but x has {x.dtype}")
    check_options(op, k, metric, exclude_self)
    n, d = x.shape
    m = ref.shape[0]
    exclude_self = exclude_self and same
    available = m - 1 if exclude_self else m
    if not 1 <= k < available:
        what = f"{m} points with self excluded" if exclude_self else f"a reference set of {m} points"
        raise ValueError(f"{op}: k must satisfy 1 <= k < {available} for {what}, got k = {k}")
    if progress not in (None, True, False):
        raise TypeError(f"{op}: progress must be None, True or False, got {progress!r}")
    block_rows = _check_rows(op, "block_rows", block_rows, d)
    ref_rows = _check_rows(op, "ref_rows", ref_rows, d)

    probe = x[:1]
    backend = _dispatch.select(op, "cpu", lambda b: _dispatch.kernel_reason(_registry.HUBNESS, b, probe, "x"))
    if backend == "reference":
        raise _dispatch.BackendUnsupportedError(
            f"{op}: the streamed path runs the fused kernels (numba or triton); the float64 module "
            "oracle needs the whole set in memory: load it and pass a tensor")
    kernels = _registry.HUBNESS.kernels(backend)
    wide = x.dtype == torch.float64 and backend == "numba"
    compute_dtype = out_dtype = torch.float64 if wide else torch.float32

    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        mu, add, r_norms, zero_r, ref_max = _reference_pass(op, "x" if same else "reference", ref, metric, compute_dtype,
                                                              ref_rows, maps)
        if same:
            zero_x, x_max = zero_r, ref_max
        else:
            zero_x, x_max = _query_pass(op, x, metric, block_rows, maps)
        _check_distance_range(op, metric, d, x_max, ref_max, x.dtype)
        big = (r_norms if zero_r is None else torch.where(zero_r, 0.0, r_norms)).max()
        p = _exact.Problem(x, ref, metric, exclude_self, out_dtype, mu, xc=None, rc=None, add=add,
                           scale=-1.0 if metric == "ip" else -2.0, bound=None, zero_x=zero_x, zero_r=zero_r,
                           paired=getattr(kernels, "paired_distances", None),
                           release=(lambda: release_pages(maps)) if maps else None,
                           read_rows=row_reader(reference if not same else original_x))
        width = p.candidates(k)

        if m <= ref_rows:  # one tile: centre it once
            whole = _exact._shifted(ref, mu, metric, compute_dtype)[0]
            release_pages(maps)

            def reference_tiles():
                yield 0, whole
        else:
            def reference_tiles():
                for start in range(0, m, ref_rows):
                    tile = _exact._shifted(ref[start:start + ref_rows], mu, metric, compute_dtype)[0]
                    release_pages(maps)
                    yield start, tile

        if want_lists:
            distances = torch.empty((n, k), dtype=out_dtype)
            indices = torch.empty((n, k), dtype=torch.int64)
        else:
            counts = torch.zeros(m, dtype=torch.int64)
        bar = _progress(n, progress, op)
        try:
            for start in range(0, n, block_rows):
                rows = torch.arange(start, min(start + block_rows, n))
                xc, x_norms = _exact._shifted(x[start:start + block_rows], mu, metric, compute_dtype)
                values, cand = _candidates(p, kernels, xc, rows, width, add, reference_tiles)
                del xc
                bound = _exact.certification_bound(metric, mu, d, x_norms, big, compute_dtype, out_dtype)
                dist, chosen = _exact.refine(p, values, cand, k, rows=rows, bound=bound)
                release_pages(maps)
                if want_lists:
                    distances[start:start + len(rows)] = dist
                    indices[start:start + len(rows)] = chosen
                else:
                    counts += torch.bincount(chosen.reshape(-1), minlength=m)
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
    return (distances, indices) if want_lists else counts
