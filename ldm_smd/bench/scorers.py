"""What the benchmark runner needs of a kind of data: the :class:`Scorer` protocol, and its two
implementations, :class:`MixtureScorer` (a Gaussian mixture with known density) and
:class:`ImageScores` (images judged by the domain classifier of :mod:`ldm_smd.eval.image_scores`).

A benchmark config names its scorer as a block, ``bench.scorer: {target, params}``; a config
whose data is a Gaussian mixture has the mixture scorer by default
(:func:`ldm_smd.bench.spec.scorer_spec`).
The runner builds it once per process (:func:`build_scorer`), before any training, so a missing
file (a prepared dataset, a classifier) is an error before any work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ldm_smd.blocks import instantiate
from ldm_smd.data.mixtures import GaussianMixture
from ldm_smd.eval import mixture_metrics as mm
from ldm_smd.eval.bench_report import Layout
from ldm_smd.eval.mixture_report import LAYOUT as MIXTURE_LAYOUT
from ldm_smd.images import to_uint8
from ldm_smd.rng import GeneratorLike

#: samples a mixture run keeps for its scatter plot and its ``.npz`` file
KEPT_SAMPLES = 4000
#: tiles of an image grid (10 x 10, the first seed's first samples)
GRID_TILES = 100


class Scorer(Protocol):
    """A benchmark's kind of data, as the runner sees it.

    - ``layout``: the metrics (the leading one first), which side of each is better and the
      reference row a perfect model would match (:class:`~ldm_smd.eval.bench_report.Layout`);
    - ``decode``: ``True`` to be given decoded images ``(N, C, H, W)`` in ``[-1, 1]`` (through the
      model's first stage), ``False`` for the diffusion variable itself, flattened to ``(N, D)``;
    - ``references``: the names of the rows that need no training;
    - :meth:`score`, :meth:`reference`, :meth:`keep` and :meth:`pictures`.
    """

    layout: Layout
    decode: bool
    references: tuple[str, ...]

    def score(self, samples: torch.Tensor, *, seed: int) -> dict[str, float]:
        """The metrics of ``samples`` (``seed``: of any randomness the metrics use)."""
        ...

    def reference(self, name: str, *, betas: torch.Tensor, num_samples: int,
                  generator: GeneratorLike, seed: int) -> tuple[dict[str, float], Any]:
        """``(metrics, samples or None)`` of reference row ``name`` at the schedule ``betas`` of
        a T, drawing ``num_samples`` with ``generator`` where it samples."""
        ...

    def keep(self, samples: Any) -> dict[str, np.ndarray]:
        """What a run keeps of its samples: the arrays of its ``.npz`` file."""
        ...

    def pictures(self, kept: Mapping[tuple[str, int], Mapping[str, np.ndarray]],
                 rows: Sequence[str], T_list: Sequence[int], out: Path) -> dict[str, str]:
        """Draw the kept samples of the first seed (by ``(row, T)``) into ``out``; returns
        ``{name: path}`` of the pictures."""
        ...


class MixtureScorer:
    """Exact metrics against a Gaussian mixture (:func:`~ldm_smd.eval.mixture_metrics.
    mixture_metrics`), with the two exact reference samplers as rows: ``exact_posterior`` (a
    perfect SMD) and ``best_gaussian`` (a perfect Gaussian denoiser).

    Args:
        mixture: the mixture, the benchmark's data (in a config: ``${data.params.mixture}``).
        num_projections: random directions of the sliced Wasserstein distance (seeded by the
            run's seed, so runs of a seed are compared on the same directions).
    """

    layout = MIXTURE_LAYOUT
    decode = False
    references = ("exact_posterior", "best_gaussian")

    def __init__(self, *, mixture: GaussianMixture, num_projections: int = 256) -> None:
        if int(num_projections) < 1:
            raise ValueError(f"MixtureScorer: num_projections={num_projections} must be >= 1")
        self.mixture = mixture
        self.num_projections = int(num_projections)

    def score(self, samples: torch.Tensor, *, seed: int) -> dict[str, float]:
        return mm.mixture_metrics(samples, self.mixture, seed=seed,
                                  num_projections=self.num_projections)

    def reference(self, name: str, *, betas: torch.Tensor, num_samples: int,
                  generator: GeneratorLike, seed: int) -> tuple[dict[str, float], torch.Tensor]:
        draw = mm.exact_posterior_sample if name == "exact_posterior" else mm.best_gaussian_sample
        x = draw(self.mixture, betas, num_samples, generator=generator)
        return self.score(x, seed=seed), x

    def keep(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        return {"samples": samples[:KEPT_SAMPLES].to(torch.float32).numpy()}

    def pictures(self, kept, rows, T_list, out: Path) -> dict[str, str]:
        from ldm_smd.eval import plots

        samples = {key: arrays["samples"] for key, arrays in kept.items()}
        return {"scatter": plots.sample_scatter(samples, self.mixture, rows, T_list,
                                                out / "scatter.png")}


IMAGE_LEGEND = (
    "fd: Fréchet distance between the domain classifier's features of the samples and of the "
    "train split (the FID of this domain); confident: share of samples the classifier labels "
    "with confidence >= 0.9 (legibility); class_kl: KL divergence of the sampled class "
    "histogram from the train split's; nn_dist: mean RMS pixel distance to the nearest train "
    "image (0 = copies of the train set); fd removed: share of vanilla's excess FD over the "
    "real data's removed, paired by seed; real_data: the held-out split scored the same way "
    "(no training: the floor at the same sample size).\n"
)


class ImageScores:
    """Images judged by the project's domain classifier: the benchmark's face of
    :class:`ldm_smd.eval.image_scores.ImageScorer`, whose metrics lead in its order (``fd``
    first), with its held-out split as the reference row ``real_data``.

    Args:
        data: the prepared dataset folder (``train.npz``, ``heldout.npz``; made by
            ``scripts/prepare_mnist5k.py``).
        classifier: the classifier's weights (default: ``DATA/classifier.safetensors``, made by
            ``ldm-smd train-classifier``).
        batch_size: images per classifier call.
    """

    decode = True
    references = ("real_data",)

    def __init__(self, *, data: str, classifier: str | None = None,
                 batch_size: int = 500) -> None:
        from ldm_smd.eval.image_scores import ImageScorer

        self.scorer = ImageScorer(data=data, classifier=classifier, batch_size=batch_size)
        self.layout = Layout(metrics=tuple(self.scorer.metrics), better=dict(self.scorer.better),
                             ideal="real_data", legend=IMAGE_LEGEND)
        self._floor: dict[str, float] | None = None

    def score(self, samples: torch.Tensor, *, seed: int) -> dict[str, float]:
        finite = torch.isfinite(samples.flatten(1)).all(1)
        # a non-finite image is scored as black and counted: the table shows such runs
        images = torch.where(torch.isfinite(samples), samples, torch.full_like(samples, -1.0))
        return {**self.scorer.score(images),
                "nonfinite": float((~finite).sum()) / max(1, len(samples))}

    def reference(self, name: str, **_: Any) -> tuple[dict[str, float], None]:
        if self._floor is None:
            self._floor = {**self.scorer.floor(), "nonfinite": 0.0}
        return dict(self._floor), None

    def keep(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        return {"images": to_uint8(samples)}

    def pictures(self, kept, rows, T_list, out: Path) -> dict[str, str]:
        from ldm_smd.eval import plots

        files = {}
        for (row, T), arrays in kept.items():
            if row in rows and T in T_list and "images" in arrays:
                name = f"{row}_T{T}"
                files[f"grid:{name}"] = plots.image_grid(arrays["images"][:GRID_TILES],
                                                         out / "grids" / f"{name}.png")
        return files


_BUILT: dict[str, Scorer] = {}


def build_scorer(spec: Mapping[str, Any]) -> Scorer:
    """The scorer of block ``spec``, built once per process (an image scorer holds the train
    split's features)."""
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _BUILT:
        _BUILT[key] = instantiate(spec)
    return _BUILT[key]
