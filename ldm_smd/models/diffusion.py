"""Stage 2 as a LightningModule: frozen first stage + network + schedule + objective + EMA.

Glue only: the network comes from ``ldm_smd.nn`` (an ``SMDNetwork`` or a plain backbone, chosen
by config), the schedule, objective and samplers from ``ldm_smd.diffusion``. Checkpoint keys
follow CompVis: ``model.diffusion_model.*`` for the network, ``model_ema.*`` for its average and
``first_stage_model.*`` for the frozen autoencoder, so a stage-2 checkpoint is self-contained.

Training randomness (timesteps, noise, SMD's ``eta``, posterior samples) comes from a generator
seeded by ``(seed, global_step, rank)``, so a resumed run draws exactly what an uninterrupted
one would have.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.config import instantiate
from ldm_smd.diffusion.objectives import build_objective
from ldm_smd.diffusion.samplers import sample as run_sampler
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.models.ema import EMA
from ldm_smd.models.first_stage import IDENTITY, FirstStage, build_first_stage
from ldm_smd.rng import GeneratorLike


class _DiffusionWrapper(nn.Module):
    """Holds the network under the CompVis key prefix ``model.diffusion_model``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = network


def check_ema_state(state_dict: dict[str, Any], ema_decay: float | None) -> None:
    """Raise :class:`CheckpointError` when a checkpoint's EMA (present or not, its decay)
    differs from the config's ``model.params.ema_decay``."""
    saved = state_dict.get("model_ema.decay")
    has_ema = saved is not None or any(k.startswith("model_ema.") for k in state_dict)
    if has_ema and not ema_decay:
        raise CheckpointError(
            "the checkpoint has an EMA of the network weights (model_ema.*) but the config sets "
            "model.params.ema_decay=null: set model.params.ema_decay to the checkpoint's decay"
            + (f" ({float(saved):g})" if saved is not None else "")
        )
    if ema_decay and not has_ema:
        raise CheckpointError(
            f"the config sets model.params.ema_decay={ema_decay:g} but the checkpoint has no EMA "
            "(no model_ema.* weights): set model.params.ema_decay=null to continue it"
        )
    if has_ema and saved is not None and abs(float(saved) - float(ema_decay)) > 1e-12:
        raise CheckpointError(
            f"the checkpoint's EMA decay is {float(saved):g} but the config sets "
            f"model.params.ema_decay={ema_decay:g}: resuming would change the average's meaning; "
            "use the checkpoint's value"
        )


class LatentDiffusion(L.LightningModule):
    """Latent (or pixel-space) diffusion with optional Soft Mixture Denoising.

    Args:
        network: ``target`` / ``params`` block of the denoising network: a backbone such as
            ``ldm_smd.nn.unet.UNetModel``, or ``ldm_smd.nn.smd.SMDNetwork`` wrapping one.
        image_size: spatial size of the diffusion variable (latent size, or pixel size when the
            first stage is the identity).
        channels: channels of the diffusion variable.
        first_stage: ``identity`` (pixel-space DDPM), or the path of a stage-1 checkpoint, a
            CompVis ``model.ckpt`` or a diffusers ``AutoencoderKL`` folder.
        first_stage_config: the first stage's architecture (``ddconfig``, ``embed_dim``): needed
            for a CompVis checkpoint without a ``config.yaml`` beside it; recorded automatically.
        scale_factor: latents are ``scale_factor * E(x)``; ``None`` takes the first stage's own
            (a diffusers folder's ``scaling_factor``), else it must be given (``ldm-smd
            scale-factor`` estimates it). Ignored for the identity.
        parameterization: what the network predicts: ``eps``, ``x0`` or ``v``.
        schedule: keyword arguments of ``NoiseSchedule`` (kind, num_timesteps, ...).
        objective: ``name`` (``vanilla``, ``smd_paper``, ``smd_mixture``) and its parameters.
        learning_rate: AdamW learning rate (used as given; never rescaled silently).
        weight_decay: AdamW weight decay.
        lr_warmup_steps: linear warm-up of the learning rate over this many steps.
        ema_decay: decay of the EMA of the network weights; ``None`` disables the EMA.
        sampler: default sampler for previews: ``name`` (ddpm, ddim, dpmpp), ``steps``,
            ``spacing``, ``ddim_eta``.
        clip_x0: clip predicted ``x0`` to ``[-1, 1]`` while sampling (pixel space only).
        seed: seed of the training randomness.
        load_first_stage_weights: read the first stage from ``first_stage``; ``False`` when the
            weights come from a stage-2 checkpoint instead.
    """

    def __init__(
        self,
        *,
        network: dict,
        image_size: int,
        channels: int,
        first_stage: str = IDENTITY,
        first_stage_config: dict | None = None,
        scale_factor: float | None = None,
        parameterization: str = "eps",
        schedule: dict | None = None,
        objective: dict | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        lr_warmup_steps: int = 0,
        ema_decay: float | None = 0.9999,
        sampler: dict | None = None,
        clip_x0: bool = False,
        seed: int = 0,
        load_first_stage_weights: bool = True,
    ) -> None:
        super().__init__()
        autoencoder, own_scale, architecture = build_first_stage(
            first_stage, architecture=first_stage_config, load_weights=load_first_stage_weights
        )
        if autoencoder is None:
            scale = 1.0
        elif scale_factor is not None:
            scale = float(scale_factor)
        elif own_scale is not None:
            scale = float(own_scale)
        else:
            raise ValueError(
                f"model.params.scale_factor is not set and the first stage {first_stage} has "
                f"none: run `ldm-smd scale-factor --ckpt {first_stage} --config DATA.yaml` "
                f"and put the value into the config"
            )
        if autoencoder is not None:
            print(f"[ldm-smd] first stage {first_stage}: latent scale factor {scale:.6g}")
        self.save_hyperparameters()
        self.hparams["first_stage_config"] = architecture
        self.hparams["scale_factor"] = scale if autoencoder is not None else scale_factor

        self.first_stage_model = FirstStage(autoencoder=autoencoder, scale_factor=scale)
        self.model = _DiffusionWrapper(instantiate(network))
        self.model_ema = (
            EMA(model=self.model.diffusion_model, decay=ema_decay) if ema_decay else None
        )
        self.schedule = NoiseSchedule(**(schedule or {}))
        objective = dict(objective or {"name": "vanilla"})
        self.objective = build_objective(
            objective.pop("name", "vanilla"), parameterization=parameterization, **objective
        )
        self.parameterization = parameterization
        self.sampler_defaults = {"name": "ddpm", "steps": None, "spacing": "uniform"}
        self.sampler_defaults.update(sampler or {})
        self.latent_shape = (channels, image_size, image_size)
        self.loss_terms: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ training

    def _generator(self, stream: int) -> torch.Generator:
        """A CPU generator for this step: a function of (seed, step, rank, stream) only."""
        seed = int(self.hparams["seed"])
        key = (seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank * 8 + stream
        return torch.Generator().manual_seed(key % (2**63 - 1))

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
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(int(self.hparams["seed"]) + batch_idx)
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

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams["learning_rate"], weight_decay=self.hparams["weight_decay"]
        )
        warmup = int(self.hparams["lr_warmup_steps"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
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
        """Draw ``n`` samples of the diffusion variable (latents, or pixels for the identity)."""
        opts = self.sampler_defaults
        network = self.model.diffusion_model
        steps = steps or opts.get("steps") or self.schedule.num_timesteps

        def denoiser(x: torch.Tensor, t: torch.Tensor, g: GeneratorLike) -> torch.Tensor:
            return network(x, t, generator=g)

        def run() -> torch.Tensor:
            return run_sampler(
                denoiser,
                (n, *self.latent_shape),
                schedule=self.schedule,
                parameterization=self.parameterization,
                sampler=sampler or opts["name"],
                steps=steps,
                spacing=spacing or opts.get("spacing", "uniform"),
                generator=generator,
                ddim_eta=opts.get("ddim_eta", 0.0) if ddim_eta is None else ddim_eta,
                clip_x0=bool(self.hparams["clip_x0"]) and self.first_stage_model.is_identity,
                progress=progress,
                device=self.device,
            )

        was_training = network.training
        network.eval()
        try:
            if use_ema and self.model_ema is not None:
                with self.model_ema.swapped_in(network):
                    return run()
            return run()
        finally:
            network.train(was_training)

    @torch.no_grad()
    def sample_images(self, n: int, *, generator: GeneratorLike, **kwargs: Any) -> torch.Tensor:
        """Draw ``n`` images in ``[-1, 1]`` (decoded through the first stage)."""
        latents = self.sample_latents(n, generator=generator, **kwargs)
        return self.first_stage_model.decode(latents).clamp(-1.0, 1.0)
