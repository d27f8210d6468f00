"""``ldm-smd eval --samples DIR --ref DIR_OR_NPZ``: FID, KID and precision / recall.

``ref`` is a folder of images or an ``.npz`` of statistics. Statistics of a reference folder are
cached as ``.npz`` (``mu``, ``sigma`` over all images and the features of up to
``max_ref_features`` of them, for KID and precision / recall) under ``$LDM_SMD_CACHE`` or
``~/.cache/ldm_smd/fid_stats``, keyed by the folder's file list (names, sizes, times) and the
weights file, so a changed folder is recomputed. A pytorch-fid ``.npz`` (``mu``, ``sigma`` only)
works for FID; KID and precision / recall then report ``None``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ldm_smd.eval import fid
from ldm_smd.eval.inception import FIDInception, resolve_weights_path

PREPROCESSING = (
    "uint8 PNG samples; PIL RGB; /255; bilinear resize to 299x299 (align_corners=False, "
    "no antialias); x*2-1; pool3 2048-d (pt_inception-2015-12-05)"
)


def _cache_dir() -> Path:
    return Path(os.environ.get("LDM_SMD_CACHE", os.path.expanduser("~/.cache/ldm_smd"))) / (
        "fid_stats"
    )


def _folder_key(files: list[Path], weights: Path) -> str:
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    st = weights.stat()
    h.update(f"weights|{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{PREPROCESSING}".encode())
    return h.hexdigest()[:20]


def _samples_source(samples: str | os.PathLike):
    path = Path(samples)
    if path.is_file() and path.suffix in (".npz", ".npy"):
        return fid.load_uint8_array(path)
    return fid.list_images(path, samples=True)


def evaluate(
    samples_dir: str | os.PathLike,
    ref: str | os.PathLike,
    *,
    out_json: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | None = None,
    weights_path: str | os.PathLike | None = None,
    min_samples: int = fid.FID_MIN_SAMPLES,
    progress: bool = True,
    ref_cache: str | os.PathLike | None = None,
    max_ref_features: int = 10_000,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_samples: int = 10_000,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID (mean, std) and k-NN precision / recall of ``samples_dir`` against ``ref``.

    Args:
        samples_dir: folder of PNG samples (or a uint8 ``(N, H, W, C)`` ``.npz``).
        ref: folder of reference images, or an ``.npz`` with ``mu``, ``sigma`` (+ ``features``).
        out_json: where to write the result (also returned).
        batch_size: Inception batch size.
        device: torch device for Inception (None: CUDA when available, else CPU).
        weights_path: the Inception weights file (default: ``$LDM_SMD_INCEPTION_WEIGHTS``, then
            the torch hub cache).
        min_samples: fewer samples (or reference images) than this is an error; 2048 is the
            least for which FID is defined; lower it only for smoke tests.
        progress: show progress bars.
        ref_cache: ``.npz`` path for a reference folder's statistics (default: the cache dir).
        max_ref_features: reference features kept in the cache for KID and precision/recall.
        kid_subsets: number of KID subsets.
        kid_subset_size: rows per KID subset.
        pr_samples: rows of each set used by precision / recall (seeded subset).
        pr_k: neighbourhood size of precision / recall.
        seed: seed of every subset choice.
    """
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    source = _samples_source(samples_dir)
    fid.check_num_samples(len(source), min_samples=min_samples)
    weights = resolve_weights_path(weights_path)
    model = None

    def get_model() -> FIDInception:
        nonlocal model
        if model is None:
            model = FIDInception(weights_path=str(weights))
        return model

    ref_path = Path(ref)
    if ref_path.is_file():
        stats = fid.load_statistics(ref_path)
        ref_note = str(ref_path)
    else:
        ref_files = fid.list_images(ref_path, samples=False)
        fid.check_num_samples(len(ref_files), min_samples=min_samples, what="reference images")
        cache = Path(ref_cache) if ref_cache else _cache_dir() / (
            f"{ref_path.resolve().name}-{_folder_key(ref_files, weights)}.npz"
        )
        if cache.is_file():
            stats = fid.load_statistics(cache)
        else:
            feats = fid.compute_features(
                get_model(), ref_files, batch_size=batch_size, device=device,
                progress=progress, desc="reference",
            )
            mu, sigma = fid.feature_statistics(feats)
            n_ref = len(feats)
            if n_ref > max_ref_features:
                keep = np.random.default_rng(seed).choice(n_ref, max_ref_features, False)
                feats = feats[np.sort(keep)]
            fid.save_statistics(cache, mu=mu, sigma=sigma, features=feats, num_samples=n_ref,
                                source=str(ref_path.resolve()))
            stats = fid.load_statistics(cache)
        ref_note = f"{ref_path} (statistics cached at {cache})"

    feats = fid.compute_features(
        get_model(), source, batch_size=batch_size, device=device, progress=progress,
        desc="samples",
    )
    if len(feats) < feats.shape[1]:  # smoke tests only: exact low-rank form, no 2048-d eigh
        fid_value = fid.frechet_distance_low_rank(feats, stats["mu"], stats["sigma"])
    else:
        mu, sigma = fid.feature_statistics(feats)
        fid_value = fid.frechet_distance(mu, sigma, stats["mu"], stats["sigma"])
    result: dict[str, Any] = {
        "fid": fid_value,
        "kid_mean": None, "kid_std": None, "precision": None, "recall": None,
        "num_samples": int(len(feats)),
        "num_ref": int(stats["num_samples"]) if "num_samples" in stats else None,
        "samples": str(samples_dir), "ref": ref_note, "weights": str(weights),
        "preprocessing": PREPROCESSING,
    }
    if len(feats) < fid.FID_MIN_SAMPLES:
        result["warning"] = f"only {len(feats)} samples: FID not comparable (smoke test)"
    ref_feats = stats.get("features")
    if ref_feats is not None and len(ref_feats) > pr_k:
        kid = fid.kernel_inception_distance(
            feats, ref_feats, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        result["kid_mean"], result["kid_std"] = kid
        rng = np.random.default_rng(seed)
        fa = feats[rng.choice(len(feats), min(pr_samples, len(feats)), replace=False)]
        ra = ref_feats[rng.choice(len(ref_feats), min(pr_samples, len(ref_feats)), False)]
        result["precision"], result["recall"] = fid.precision_recall(ra, fa, k=pr_k)
    else:
        result["note"] = "reference .npz has no features: KID and precision/recall skipped"
    if out_json is not None:
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        os.replace(tmp, out)
    return result


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_result(result: dict[str, Any]) -> str:
    """One line per metric, for printing."""
    lines = []
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        v = result.get(key)
        lines.append(f"{key:>10}: " + ("n/a" if v is None or not math.isfinite(v) else f"{v:.6g}"))
    lines.append(f"{'samples':>10}: {result['num_samples']}")
    return "\n".join(lines)
