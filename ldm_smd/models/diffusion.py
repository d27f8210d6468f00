"""Stage 2 as a LightningModule: frozen first stage + network + schedule + objective + EMA.

Glue only: the network comes from ``ldm_smd.nn`` (an ``SMDNetwork`` or a plain backbone, chosen
by config), the schedule, objective and samplers from ``ldm_smd.diffusion``. Checkpoint keys
follow CompVis: ``model.diffusion_model.*`` for the network, ``model_ema.*`` for its average and
``first_stage_model.*`` for the frozen autoencoder, so a stage-2 checkpoint is self-contained.

The components are named one way, as ``target`` / ``params`` blocks: ``network``, ``schedule``
(:class:`~ldm_smd.diffusion.schedule.NoiseSchedule`), ``objective`` (a class of
:mod:`ldm_smd.diffusion.objectives`) and ``sampler`` (:class:`~ldm_smd.diffusion.samplers.Sampler`);
the config loader checks every key of them against the constructors before any work
(:meth:`LatentDiffusion.check_config`). Soft Mixture Denoising is chosen by the network's
target (:class:`~ldm_smd.nn.smd.SMDNetwork`); the denoising objective over it is the paper's.

Training randomness (timesteps, noise, SMD's ``eta``, posterior samples) comes from a generator
seeded ``derive_seed(seed, TRAIN_STREAM, global_step, rank, stream)``, so a resumed run draws
exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn

from ldm_smd import rng
from ldm_smd.blocks import instantiate
from ldm_smd.config import ConfigError
from ldm_smd.diffusion.samplers import Sampler
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.models.components import check_model_params, component
from ldm_smd.models.ema import EMA, check_ema_state
from ldm_smd.models.first_stage import (
    IDENTITY,
    FirstStage,
    build_first_stage,
    resolve_scale_factor,
)
from ldm_smd.rng import GeneratorLike

#: first keys of the seeds derived from ``seed`` (see :mod:`ldm_smd.rng`)
TRAIN_STREAM, VALIDATION_STREAM = 1, 2


class _DiffusionWrapper(nn.Module):
    """Holds the network under the CompVis key prefix ``model.diffusion_model``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = network


class LatentDiffusion(L.LightningModule):
    """Latent (or pixel-space, or vector) diffusion with optional Soft Mixture Denoising.

    Args:
        network: ``target`` / ``params`` block of the denoising network: a backbone such as
            ``ldm_smd.nn.unet.UNetModel`` or ``ldm_smd.nn.mlp.MLPDenoiser``, or
            ``ldm_smd.nn.smd.SMDNetwork`` wrapping one.
        latent_shape: shape of one diffusion variable: ``[C, H, W]`` for images or latents,
            ``[D]`` for vectors; give it or ``image_size`` and ``channels``, not both.
        image_size: spatial size of the diffusion variable (latent size, or pixel size when the
            first stage is the identity): CompVis's name, with ``channels`` for
            ``latent_shape = [channels, image_size, image_size]``.
        channels: channels of the diffusion variable (with ``image_size``).
        first_stage: ``identity`` (pixel-space DDPM), or the path of a stage-1 checkpoint, a
            CompVis ``model.ckpt`` or a diffusers ``AutoencoderKL`` folder.
        first_stage_config: the first stage's architecture (``ddconfig``, ``embed_dim``): needed
            for a CompVis checkpoint without a ``config.yaml`` beside it; recorded automatically.
        scale_factor: latents are ``scale_factor * E(x)``; ``None`` takes the first stage's own
            (a diffusers folder's ``scaling_factor``, ...), else it must be given (``ldm-smd
            scale-factor`` estimates it). Ignored for the identity. The precedence is
            :func:`~ldm_smd.models.first_stage.resolve_scale_factor`'s.
        parameterization: what the network predicts: ``eps``, ``x0`` or ``v`` (also the
            objective's; the objective block does not repeat it).
        schedule: ``target`` / ``params`` block of the noise schedule (default
            ``NoiseSchedule()``).
        objective: ``target`` / ``params`` block of the training objective: ``DenoisingObjective``
            (default; over an SMD network it is the paper's objective), ``MixtureObjective`` or
            ``EnergyObjective`` (these two need an SMD network), from
            :mod:`ldm_smd.diffusion.objectives`.
        learning_rate: AdamW learning rate (used as given; never rescaled silently).
        weight_decay: AdamW weight decay.
        lr_warmup_steps: linear warm-up of the learning rate over this many steps.
        lr_schedule: ``constant``, or ``cosine``: ``0.5 (1 + cos(pi s / S))`` times the rate at
            step ``s`` of ``S = trainer.max_steps`` (to zero at the end of the run).
        ema_decay: decay of the EMA of the network weights; ``None`` disables the EMA.
        sampler: ``target`` / ``params`` block of the default sampler (previews, ``ldm-smd
            sample``): ``ldm_smd.diffusion.samplers.Sampler`` (kind, steps, spacing, ddim_eta).
        clip_x0: clip predicted ``x0`` to ``[-1, 1]`` while sampling (pixel space only).
        seed: seed of the training randomness.
        load_first_stage_weights: read the first stage from ``first_stage``; ``False`` when the
            weights come from a stage-2 checkpoint instead.
    """

    def __init__(
        self,
        *,
        network: dict,
        latent_shape: list[int] | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        first_stage: str = IDENTITY,
        first_stage_config: dict | None = None,
        scale_factor: float | None = None,
        parameterization: str = "eps",
        schedule: dict | None = None,
        objective: dict | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        ema_decay: float | None = 0.9999,
        sampler: dict | None = None,
        clip_x0: bool = False,
        seed: int = 0,
        load_first_stage_weights: bool = True,
    ) -> None:
        super().__init__()
        self.check_config(
            {"network": network, "latent_shape": latent_shape, "image_size": image_size,
             "channels": channels, "schedule": schedule, "objective": objective,
             "sampler": sampler, "lr_schedule": lr_schedule},
            key="model",
        )
        autoencoder, recorded, architecture = build_first_stage(
            first_stage, architecture=first_stage_config, load_weights=load_first_stage_weights
        )
        scale, source = resolve_scale_factor(
            first_stage, configured=scale_factor, recorded=recorded
        )
        if autoencoder is not None:
            print(f"[ldm-smd] first stage {first_stage}: latent scale factor {scale:.6g} "
                  f"({source})")
        self.save_hyperparameters()
        self.hparams["first_stage_config"] = architecture
        self.hparams["scale_factor"] = scale if autoencoder is not None else scale_factor

        self.first_stage_model = FirstStage(autoencoder=autoencoder, scale_factor=scale)
        self.model = _DiffusionWrapper(instantiate(network))
        self.model_ema = (
            EMA(model=self.model.diffusion_model, decay=ema_decay) if ema_decay else None
        )
        self.schedule: NoiseSchedule = instantiate(component(schedule, "schedule"))
        self.objective = instantiate(
            component(objective, "objective"), parameterization=parameterization
        )
        self.sampler: Sampler = instantiate(component(sampler, "sampler"))
        self.parameterization = parameterization
        self.latent_shape = tuple(
            int(v) for v in (latent_shape or (channels, image_size, image_size))
        )
        self.loss_terms: dict[str, torch.Tensor] = {}

    @classmethod
    def check_config(cls, params: Mapping[str, Any], *, key: str = "model") -> None:
        """What the signature cannot say, checked when a config is loaded (before any work):
        :func:`ldm_smd.models.components.check_model_params`."""
        check_model_params(params, key=key)

    # ------------------------------------------------------------------ training

    def _generator(self, stream: int) -> torch.Generator:
        """A CPU generator for this step: a function of (seed, step, rank, stream) only."""
        return rng.generator(int(self.hparams["seed"]), TRAIN_STREAM, self.global_step,
                             self.global_rank, stream)

    def forward_loss(
        self, images: torch.Tensor, generator: GeneratorLike
    ) -> tuple[torch.Tensor, dict]:
        latents = self.first_stage_model.encode(images, generator=generator)
        return self.objective(
            self.model.diffusion_model, latents, schedule=self.schedule, generator=generator
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logs = self.forward_loss(batch["image"], self._generator(0))
        # read by the NaN guard before the optimizer step, to name a non-finite term
        self.loss_terms = {"loss": loss, **logs}
        trainer = self.trainer
        if trainer.loggers or trainer.progress_bar_callback is not None:
            # self.log costs about 0.5 ms a value on the CPU: only where a logger or the bar
            # shows it (a run without either, as each benchmark run, saves that per step)
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        generator = rng.generator(int(self.hparams["seed"]), VALIDATION_STREAM, batch_idx)
        loss, logs = self.forward_loss(batch["image"], generator)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA follows every optimizer step, before any checkpoint of that step is written
        # (ModelCheckpoint saves in the callbacks' on_train_batch_end, before the module's)
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:
            self.model_ema.update(self.model.diffusion_model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose EMA disagrees with this model's config (before loading)."""
        check_ema_state(checkpoint.get("state_dict") or {}, self.hparams["ema_decay"])

    def lr_factor(self, step: int, total_steps: int | None) -> float:
        """The learning rate at optimizer step ``step`` over the configured rate: the warm-up
        times the schedule (``total_steps`` is the run's length, needed by ``cosine``)."""
        warmup = int(self.hparams["lr_warmup_steps"])
        factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if self.hparams["lr_schedule"] == "cosine":
            if not total_steps or total_steps < 1:
                raise ConfigError(
                    "model.params.lr_schedule=cosine decays over the run: set trainer.max_steps"
                )
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return factor

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams["learning_rate"], weight_decay=self.hparams["weight_decay"]
        )
        total = None
        if self.hparams["lr_schedule"] == "cosine":
            total = int(self.trainer.max_steps)
            self.lr_factor(0, total)  # a missing max_steps is an error now, not at step 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_factor(step, total)
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_latents(
        self,
        n: int,
        *,
        generator: GeneratorLike,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        ddim_eta: float | None = None,
        use_ema: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Draw ``n`` samples of the diffusion variable (latents, pixels or vectors) with the
        model's sampler; ``sampler`` (its kind), ``steps``, ``spacing``, ``ddim_eta`` override
        the options of the ``sampler`` block."""
        chosen = self.sampler.replace(kind=sampler, steps=steps, spacing=spacing,
                                      ddim_eta=ddim_eta)
        with self.sampling_network(use_ema=use_ema) as network:
            return chosen.run(
                network,
                (n, *self.latent_shape),
                schedule=self.schedule,
                parameterization=self.parameterization,
                generator=generator,
                clip_x0=self.clips_x0,
                progress=progress,
                device=self.device,
            )

    @property
    def clips_x0(self) -> bool:
        """Whether sampling clamps the x0 estimate to [-1, 1] (``clip_x0``, pixel space only)."""
        return bool(self.hparams["clip_x0"]) and self.first_stage_model.is_identity

    @contextmanager
    def sampling_network(self, *, use_ema: bool = True) -> Iterator[nn.Module]:
        """The network with the weights sampling uses (the EMA's where there is one and
        ``use_ema``), in eval mode; its weights and mode are restored on leaving."""
        network = self.model.diffusion_model
        was_training = network.training
        network.eval()
        try:
            if use_ema and self.model_ema is not None:
                with self.model_ema.swapped_in(network):
                    yield network
            else:
                yield network
        finally:
            network.train(was_training)

    @torch.no_grad()
    def sample_images(self, n: int, *, generator: GeneratorLike, **kwargs: Any) -> torch.Tensor:
        """Draw ``n`` images in ``[-1, 1]`` (decoded through the first stage)."""
        latents = self.sample_latents(n, generator=generator, **kwargs)
        return self.first_stage_model.decode(latents).clamp(-1.0, 1.0)

