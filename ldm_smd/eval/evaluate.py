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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ldm_smd.devices import resolve_device
from ldm_smd.errors import OutputError, UsageError
from ldm_smd.eval import fid
from ldm_smd.eval.inception import FEATURE_DIM, FIDInception, resolve_weights_path
from ldm_smd.fileio import atomic_write, check_writable

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
    if path.is_file():
        raise fid.EvalInputError(f"--samples {path} is a file; give a folder of PNGs or an .npz")
    return fid.list_images(path, samples=True)


def _check_statistics(stats: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    mu, sigma = np.asarray(stats["mu"]), np.asarray(stats["sigma"])
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise fid.EvalInputError(
            f"--ref {path}: statistics of shape mu {mu.shape}, sigma {sigma.shape}; expected the "
            f"{FEATURE_DIM}-d pool3 features of the FID Inception"
        )
    return stats


def write_result(result: dict[str, Any], out_json: str | os.PathLike) -> Path:
    """Write ``result`` as JSON (to a temporary name, then renamed)."""
    text = json.dumps(result, indent=2, default=_json_default) + "\n"
    return atomic_write(out_json, lambda handle: handle.write(text.encode()))


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
    report: Callable[[dict[str, Any]], None] | None = None,
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
        report: called with the result before it is written to ``out_json``, so a failed write
            loses nothing (the command line prints it).

    Every input is checked before any feature is computed: the device, ``out_json`` (writable,
    not a folder), the sample and reference sets (present, enough of them) and the Inception
    weights (loaded).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if min_samples < 2:
        raise UsageError(f"--min-samples {min_samples}: FID needs at least 2 samples")
    device = resolve_device(device)
    if out_json is not None:
        check_writable(out_json, what="--out", folder=False)
    source = _samples_source(samples_dir)
    fid.check_num_samples(len(source), min_samples=min_samples)
    ref_path = Path(ref)
    ref_files = None
    if ref_path.is_file():
        stats = _check_statistics(fid.load_statistics(ref_path), ref_path)
        ref_note = str(ref_path)
    elif ref_path.is_dir():
        ref_files = fid.list_images(ref_path, samples=False)
        fid.check_num_samples(len(ref_files), min_samples=min_samples, what="reference images")
    else:
        raise fid.EvalInputMissing(
            f"--ref {ref_path}: no such folder of reference images or statistics .npz"
        )
    weights = resolve_weights_path(weights_path)
    model = FIDInception(weights_path=str(weights))

    if ref_files is not None:
        cache = Path(ref_cache) if ref_cache else _cache_dir() / (
            f"{ref_path.resolve().name}-{_folder_key(ref_files, weights)}.npz"
        )
        if cache.is_file():
            stats = fid.load_statistics(cache)
        else:
            feats = fid.compute_features(
                model, ref_files, batch_size=batch_size, device=device,
                progress=progress, desc="reference",
            )
            mu, sigma = fid.feature_statistics(feats)
            n_ref = len(feats)
            if n_ref > max_ref_features:
                keep = np.random.default_rng(seed).choice(n_ref, max_ref_features, False)
                feats = feats[np.sort(keep)]
            # the same arrays (and dtypes) a later run reads back from the cache
            stats = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
                     "features": np.asarray(feats, np.float32), "num_samples": np.int64(n_ref)}
            try:
                fid.save_statistics(cache, mu=mu, sigma=sigma, features=feats,
                                    num_samples=n_ref, source=str(ref_path.resolve()))
            except OSError as exc:
                print(f"[ldm-smd] warning: the reference statistics could not be cached at "
                      f"{cache} ({exc.strerror or exc}); they will be computed again next time")
                cache = None
        ref_note = f"{ref_path} (statistics cached at {cache})" if cache else str(ref_path)

    feats = fid.compute_features(
        model, source, batch_size=batch_size, device=device, progress=progress,
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
    if report is not None:
        report(result)
    if out_json is not None:
        try:
            write_result(result, out_json)
        except OutputError as exc:
            kept = "the metrics were printed above" if report is not None else "nothing kept"
            raise OutputError(f"{exc}; {kept}") from exc
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
