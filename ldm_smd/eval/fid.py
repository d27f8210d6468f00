"""FID, KID and k-NN precision / recall on Inception pool3 features.

Pinned preprocessing (what makes numbers comparable with the FID literature):

1. Samples are quantised to uint8 exactly like :func:`ldm_smd.images.to_uint8` does (``[-1, 1]`` ->
   ``round((x + 1) * 127.5)`` clipped to 0..255) and stored as **PNG** (lossless). JPEG changes
   FID by several points, so a samples folder holding JPEG files is refused.
2. Images are read with PIL, converted to RGB (grayscale is repeated), turned into ``[0, 1]``
   floats (``uint8 / 255``) and resized by the network to 299x299, bilinear,
   ``align_corners=False``, no antialiasing (as pytorch-fid does); see :mod:`.inception`.
3. Statistics are float64: ``mu`` the mean and ``sigma`` the unbiased covariance (``np.cov``).

FID needs at least 2,048 samples (the feature dimension): with fewer, ``sigma`` is singular and
the number is meaningless. The standard protocol, and the default of the sweep script, is 50,000
samples against the statistics of the full training set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_smd.errors import LdmSmdError
from ldm_smd.fileio import atomic_write

FID_MIN_SAMPLES = 2048
FID_STANDARD_SAMPLES = 50_000
SAMPLE_EXTS = (".png", ".bmp", ".tif", ".tiff", ".ppm")
REF_EXTS = SAMPLE_EXTS + (".jpg", ".jpeg", ".webp")
LOSSY_EXTS = (".jpg", ".jpeg", ".webp")


class TooFewSamples(LdmSmdError, ValueError):
    """Fewer samples than a metric needs."""


class EvalInputError(LdmSmdError, ValueError):
    """A sample or reference folder, array or statistics file that cannot be used."""


class EvalInputMissing(LdmSmdError, FileNotFoundError):
    """A sample or reference folder or file that does not exist."""


# ------------------------------------------------------------------------------ images


def list_images(folder: str | os.PathLike, *, samples: bool) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted). ``samples=True`` refuses lossy formats."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalInputMissing(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in REF_EXTS and p.is_file())
    if samples:
        lossy = [p for p in files if p.suffix.lower() in LOSSY_EXTS]
        if lossy:
            raise EvalInputError(
                f"{root}: {len(lossy)} sample files are lossy (e.g. {lossy[0].name}); save "
                f"samples as PNG, since JPEG compression shifts FID by several points"
            )
    return files


def load_uint8_array(path: str | os.PathLike) -> np.ndarray:
    """An ``.npz`` / ``.npy`` of uint8 images ``(N, H, W, C)``: key ``images`` (our
    ``samples.npz``), ``arr_0`` (OpenAI's convention) or ``samples``."""
    path = Path(path)
    try:
        data = np.load(path)
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = [k for k in ("images", "arr_0", "samples") if k in data.files]
            if not keys:
                raise EvalInputError(
                    f"{path}: no 'images', 'arr_0' or 'samples' array; has {data.files}"
                )
            key = keys[0]
            data = data[key]
    except LdmSmdError:
        raise
    except (OSError, ValueError, EOFError, KeyError) as exc:  # what np.load raises on a bad file
        raise EvalInputError(f"{path} is not a readable .npz/.npy of images: {exc}") from exc
    if data.dtype != np.uint8 or data.ndim != 4:
        raise EvalInputError(f"{path}: expected uint8 (N, H, W, C) images, got {data.dtype} "
                             f"{data.shape}")
    return data


def _to_float(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255.0
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3]


def iter_image_batches(
    source: Sequence[Path] | np.ndarray, batch_size: int
) -> Iterator[torch.Tensor]:
    """``(B, 3, H, W)`` float batches in ``[0, 1]`` from image files or a uint8 NHWC array."""
    for start in range(0, len(source), batch_size):
        chunk = source[start : start + batch_size]
        if isinstance(source, np.ndarray):
            yield _to_float(chunk)
            continue
        arrays = []
        for p in chunk:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            # Resize is per batch; images of different sizes go one at a time.
            for a in arrays:
                yield _to_float(a[None])
        else:
            yield _to_float(np.stack(arrays))


@torch.no_grad()
def compute_features(
    model: torch.nn.Module,
    source: Sequence[Path] | np.ndarray,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "inception",
) -> np.ndarray:
    """Inception features ``(N, 2048)`` float32 of every image in ``source``."""
    from tqdm.auto import tqdm

    model = model.to(device)
    feats = []
    with tqdm(total=len(source), desc=desc, disable=not progress, unit="img") as bar:
        for batch in iter_image_batches(source, batch_size):
            feats.append(model(batch.to(device)).cpu().numpy().astype(np.float32))
            bar.update(batch.shape[0])
    if not feats:
        return np.zeros((0, 2048), dtype=np.float32)
    return np.concatenate(feats)


# ------------------------------------------------------------------------------ metrics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def check_num_samples(n: int, *, min_samples: int = FID_MIN_SAMPLES, what: str = "samples"):
    """Raise :class:`TooFewSamples` when ``n < min_samples``."""
    if n < min_samples:
        raise TooFewSamples(
            f"FID needs at least {min_samples} {what} (the Inception feature dimension is 2048: "
            f"with fewer the covariance is singular and FID is meaningless); got {n}. The "
            f"standard protocol uses {FID_STANDARD_SAMPLES:,}. For a smoke test only, allow "
            f"fewer with min_samples= (--min-samples); such numbers are not comparable."
        )


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, float64.

    The trace term uses ``tr((S1 S2)^(1/2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1)))``: a symmetric
    positive semi-definite eigenproblem, so there is no imaginary part to discard and singular
    covariances need no ad-hoc offset (tiny negative eigenvalues from rounding are clipped to 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"frechet_distance: shapes differ: {mu1.shape}/{s1.shape} vs "
                         f"{mu2.shape}/{s2.shape}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_low_rank(
    features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """:func:`frechet_distance` of the statistics of ``features`` (``n`` rows) against
    ``(mu2, sigma2)``, exact and fast when ``n`` is below the feature dimension.

    With ``A`` the centred features over ``sqrt(n - 1)``, ``S1 = A^T A`` and the non-zero
    eigenvalues of ``sqrt(S2) S1 sqrt(S2)`` are those of the ``n x n`` matrix ``A S2 A^T``.
    """
    f = np.asarray(features, np.float64)
    n = f.shape[0]
    if n < 2:
        raise TooFewSamples(f"frechet_distance needs at least 2 samples, got {n}")
    mu1 = f.mean(axis=0)
    a = (f - mu1) / np.sqrt(n - 1)
    s2 = np.asarray(sigma2, np.float64)
    s2 = (s2 + s2.T) / 2
    small = a @ s2 @ a.T
    ev = np.linalg.eigvalsh((small + small.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff @ diff + (a * a).sum() + np.trace(s2) - 2.0 * tr_covmean)


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, averaged
    over ``num_subsets`` random subsets of ``min(subset_size, n1, n2)`` rows; ``(mean, std)``."""
    f1 = np.asarray(f1, np.float64)
    f2 = np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise TooFewSamples(f"KID needs at least 2 samples in each set, got {len(f1)}, {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = m * (m - 1)
        vals.append(
            (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
            - 2 * kxy.mean()
        )
    vals = np.asarray(vals)
    return float(vals.mean()), float(vals.std())


def _kth_nn_radius(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for s in range(0, f.shape[0], chunk):
        d = torch.cdist(f[s : s + chunk], f)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at 0
    return torch.cat(radii)


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int):
    inside = []
    for s in range(0, query.shape[0], chunk):
        d = torch.cdist(query[s : s + chunk], support)
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    Precision: share of ``fake`` inside the union of balls around ``real`` points, each with the
    radius to its ``k``-th nearest real neighbour; recall: the same with the roles swapped.
    """
    r = torch.from_numpy(np.asarray(real, np.float64))
    f = torch.from_numpy(np.asarray(fake, np.float64))
    if min(len(r), len(f)) <= k:
        raise TooFewSamples(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _coverage(f, r, _kth_nn_radius(r, k, chunk), chunk)
    recall = _coverage(r, f, _kth_nn_radius(f, k, chunk), chunk)
    return precision, recall


# ------------------------------------------------------------------------------ stats files


def save_statistics(
    path: str | os.PathLike,
    *,
    mu: np.ndarray,
    sigma: np.ndarray,
    features: np.ndarray | None = None,
    num_samples: int | None = None,
    **meta: str,
) -> None:
    """Write ``mu``, ``sigma`` and optionally ``features`` (float32) to ``path`` atomically.

    ``mu`` and ``sigma`` may come from more rows than the stored ``features`` (a subset kept
    for KID and precision / recall); ``num_samples`` is the number of rows behind ``mu``.
    """
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if num_samples is not None:
        arrays["num_samples"] = np.int64(num_samples)
    atomic_write(path, lambda handle: np.savez(
        handle, **arrays, **{k: np.str_(v) for k, v in meta.items()}))


def load_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's format) and maybe ``features``."""
    try:
        with np.load(Path(path)) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise EvalInputError(
                    f"{path}: reference statistics need arrays {missing}; has {data.files}"
                )
            return {k: data[k] for k in data.files}
    except LdmSmdError:
        raise
    except (OSError, ValueError, EOFError, KeyError, AttributeError) as exc:
        raise EvalInputError(f"{path} is not a readable statistics .npz: {exc}") from exc
