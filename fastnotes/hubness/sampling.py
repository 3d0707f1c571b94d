"""Hub-prior latent selection (docs/hubness.md; Liang et al., ICML 2022; Su, kexue.fm 9147):
draw a pool of latents, count each one's k-occurrence within the pool, keep the hubs."""
import torch

from .knn import k_occurrence


def _check(n, k, threshold, pool_size, max_pools):
    for name, value, low in (("n", n, 1), ("k", k, 1), ("pool_size", pool_size, 2), ("max_pools", max_pools, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"hub_sample: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"hub_sample: threshold must be a number, got {threshold!r}")


def hub_sample(sample_fn, n, *, k=5, threshold=50, pool_size=10000, strict=False, include_self=False,
               feature_fn=None, metric="sqeuclidean", max_pools=1000):
    """n latents whose k-occurrence within their pool passes the threshold.

    Pools are drawn one at a time with sample_fn(pool_size) (e.g. `lambda m: torch.randn(m, 512)`);
    N_k is counted within each pool, on feature_fn(latents) when given (the Colab counts in StyleGAN's
    W space: `feature_fn=lambda z: G.mapping(z, None)[:, 0]`), else on the latents flattened per row.
    A latent is kept when N_k >= threshold (N_k > threshold with strict=True). Hubness is relative to
    the pool: keep pool_size fixed (10000 in both sources). Conventions:
        Su's blog code: k=5, threshold=50, strict=True (self excluded);
        the official Colab: k=5, threshold=50, include_self=True (self counted as one of the k).
    With include_self the point competes for its own list at distance 0 (exact duplicates aside,
    N_k with self = 1 + N_(k-1) without). At d = 512, k = 5 about 1.6-1.9% of Gaussian latents pass.

    Returns the first n kept latents in draw order, [n, ...]. Raises RuntimeError after max_pools
    pools without n hubs.
    """
    _check(n, k, threshold, pool_size, max_pools)
    kept, found = [], 0
    for _ in range(max_pools):
        latents = sample_fn(pool_size)
        if not isinstance(latents, torch.Tensor) or latents.dim() < 2 or latents.shape[0] != pool_size:
            raise ValueError(f"hub_sample: sample_fn({pool_size}) must return a tensor with {pool_size} rows, got "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        features = latents if feature_fn is None else feature_fn(latents)
        counts = k_occurrence(features.reshape(pool_size, -1), k, metric=metric, exclude_self=not include_self)
        keep = counts > threshold if strict else counts >= threshold
        chosen = latents[keep.to(latents.device)]
        kept.append(chosen)
        found += chosen.shape[0]
        if found >= n:
            return torch.cat(kept)[:n]
    raise RuntimeError(f"hub_sample: only {found} of {n} latents passed N_{k} {'>' if strict else '>='} {threshold} "
                       f"in {max_pools} pools of {pool_size}")
