"""Stage 1 as a Lightning module: the KL autoencoder trained with L1 + LPIPS + KL + patch-GAN.

Manual optimisation with two Adam optimisers (autoencoder, discriminator), one batch = one
generator step, then one discriminator step once the GAN is active. The checkpoint's
``state_dict`` has CompVis's first-stage layout: ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*`` (the autoencoder) and ``loss.*`` (log-variance, LPIPS, discriminator), so
:func:`ldm_smd.convert.load_first_stage` reads ours and CompVis's ``model.ckpt`` alike.
Hyper-parameters are stored as plain data, loadable with ``torch.load(weights_only=True)``.

Note: Lightning's ``global_step`` counts optimiser steps, i.e. two per batch once the
discriminator trains; ``disc_start`` is counted in batches (``fit_loop.total_batch_idx``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ldm_smd.blocks import instantiate
from ldm_smd.config import to_plain
from ldm_smd.images import save_grid
from ldm_smd.models.losses import LPIPSWithDiscriminator
from ldm_smd.nn.autoencoder import AutoencoderKL as AutoencoderNet
from ldm_smd.nn.autoencoder import check_ddconfig

LOSS_TARGET = "ldm_smd.models.losses.LPIPSWithDiscriminator"


class AutoencoderKL(L.LightningModule):
    """The KL autoencoder of stage 1 (CompVis ``ldm.models.autoencoder.AutoencoderKL``).

    ``self.autoencoder`` is the pure network (:class:`ldm_smd.nn.autoencoder.AutoencoderKL`); its
    four parts are registered on this module directly, under CompVis's names.

    Args:
        ddconfig: Encoder/Decoder architecture (CompVis keys ``ch``, ``ch_mult``, ...).
        embed_dim: latent channels.
        lossconfig: ``{target, params}`` of the loss; the target defaults to
            ``ldm_smd.models.losses.LPIPSWithDiscriminator``.
        learning_rate: Adam learning rate of both optimisers, used as given.
        adam_betas: Adam betas of both optimisers.
        image_key: key of the image tensor in a batch dict.
        log_images_n: inputs shown (above their reconstructions) in the image grid written on
            the first validation batch.
        log_images_every_n_steps: also write that grid from a training batch every this many
            batches (0: never); grids go to ``<run dir>/reconstructions/step_XXXXXX.png``.
    """

    def __init__(
        self,
        *,
        ddconfig: dict,
        embed_dim: int,
        lossconfig: dict | None = None,
        learning_rate: float = 4.5e-6,
        adam_betas: tuple[float, float] = (0.5, 0.9),
        image_key: str = "image",
        log_images_n: int = 8,
        log_images_every_n_steps: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        lossconfig = to_plain(lossconfig) if lossconfig is not None else {"target": LOSS_TARGET}
        lossconfig = {"target": lossconfig.get("target", LOSS_TARGET),
                      "params": dict(lossconfig.get("params") or {})}
        self.save_hyperparameters({
            "ddconfig": check_ddconfig(to_plain(ddconfig)), "embed_dim": int(embed_dim),
            "lossconfig": lossconfig, "learning_rate": float(learning_rate),
            "adam_betas": [float(b) for b in adam_betas], "image_key": str(image_key),
            "log_images_n": int(log_images_n),
            "log_images_every_n_steps": int(log_images_every_n_steps),
        })
        net = AutoencoderNet(ddconfig=self.hparams["ddconfig"], embed_dim=int(embed_dim))
        self.encoder, self.decoder = net.encoder, net.decoder
        self.quant_conv, self.post_quant_conv = net.quant_conv, net.post_quant_conv
        # The same modules, reachable as one network without being registered twice.
        object.__setattr__(self, "autoencoder", net)
        self.loss: LPIPSWithDiscriminator = instantiate(lossconfig)
        self._check_channels()

    def _check_channels(self) -> None:
        """The reconstruction has the input's channels, and so does what the discriminator
        sees (a ValueError naming the keys: the run's build turns it into a config error)."""
        dd = self.hparams["ddconfig"]
        if dd["out_ch"] != dd["in_channels"]:
            raise ValueError(
                f"model.params.ddconfig.out_ch={dd['out_ch']} differs from "
                f"model.params.ddconfig.in_channels={dd['in_channels']}: an autoencoder "
                f"reconstructs its input's channels"
            )
        discriminator = getattr(self.loss, "discriminator", None)
        seen = getattr(discriminator, "input_nc", dd["in_channels"])
        if seen != dd["in_channels"]:
            raise ValueError(
                f"model.params.lossconfig.params.disc_in_channels={seen} differs from "
                f"model.params.ddconfig.in_channels={dd['in_channels']}: the discriminator "
                f"sees the images and their reconstructions"
            )

    # ------------------------------------------------------------------ helpers
    def _images(self, batch: Any) -> torch.Tensor:
        key = self.hparams["image_key"]
        if not isinstance(batch, Mapping) or key not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"batch must be a dict with key {key!r} (B, C, H, W); got {found}")
        return batch[key]

    def _step(self) -> int:
        """Batches trained so far (the step ``disc_start`` refers to)."""
        trainer = self._trainer
        return int(trainer.fit_loop.total_batch_idx) if trainer is not None else 0

    def _optimizers(self) -> tuple[Any, Any]:
        opts = self.optimizers()
        if isinstance(opts, (list, tuple)):
            return opts[0], opts[1]
        return opts, None

    # ------------------------------------------------------------------ Lightning hooks
    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, Any]:
        return self.autoencoder(x, sample_posterior=sample_posterior)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self._images(batch)
        step = self._step()
        opt_g, opt_d = self._optimizers()
        reconstructions, posterior = self.autoencoder(x)
        g_loss, logs = self.loss.generator_loss(
            x, reconstructions, posterior, step=step, last_layer=self.autoencoder.last_layer()
        )
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self.loss_terms = {"g_loss": g_loss, **logs}  # named by the NaN guard if non-finite
        opt_g.step()
        if opt_d is not None and self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, reconstructions, step=step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self.loss_terms = {"d_loss": d_loss, **d_logs}
            opt_d.step()
            logs.update(d_logs)
        every = self.hparams["log_images_every_n_steps"]
        if every > 0 and step % every == 0 and self.hparams["log_images_n"] > 0:
            self._log_reconstructions(x, reconstructions, tag="train")
        self.log("train/rec_loss", logs.pop("train/rec_loss"), prog_bar=True)
        self.log_dict(logs, prog_bar=False)
        return g_loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._images(batch)
        step = self._step()
        reconstructions, posterior = self.autoencoder(x, sample_posterior=False)
        _, logs = self.loss.generator_loss(x, reconstructions, posterior, step=step, split="val")
        if self.loss.gan_active(step):
            logs.update(self.loss.discriminator_loss(x, reconstructions, step=step, split="val")[1])
        self.log("val/rec_loss", logs.pop("val/rec_loss"), prog_bar=True, sync_dist=True)
        self.log_dict(logs, sync_dist=True)
        if batch_idx == 0 and self.hparams["log_images_n"] > 0:
            self._log_reconstructions(x, reconstructions, tag="val")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr, betas = self.hparams["learning_rate"], tuple(self.hparams["adam_betas"])
        params = list(self.autoencoder.parameters())
        if self.loss.learn_logvar:
            params.append(self.loss.logvar)
        optimizers = [torch.optim.Adam(params, lr=lr, betas=betas)]
        if self.loss.gan_enabled:
            optimizers.append(
                torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=betas)
            )
        return optimizers

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def log_images(self, batch: Any, n: int | None = None) -> dict[str, torch.Tensor]:
        """``inputs`` and their (posterior-mode) ``reconstructions``, both in [-1, 1]."""
        x = self._images(batch)[: n or self.hparams["log_images_n"]]
        reconstructions, _ = self.autoencoder(x, sample_posterior=False)
        return {"inputs": x, "reconstructions": reconstructions.clamp(-1, 1)}

    def _log_reconstructions(
        self, x: torch.Tensor, reconstructions: torch.Tensor, *, tag: str
    ) -> None:
        """Inputs (top row) over reconstructions (bottom row): a PNG, and TensorBoard if used."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        n = min(self.hparams["log_images_n"], x.shape[0])
        grid = torch.cat([x[:n], reconstructions[:n].clamp(-1, 1)]).detach().float().cpu()
        folder = Path(trainer.default_root_dir) / "reconstructions"
        save_grid(grid, folder / f"{tag}_step_{trainer.global_step:06d}.png", nrow=n)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_images"):
                experiment.add_images(f"{tag}/inputs_over_reconstructions", (grid + 1) / 2,
                                      trainer.global_step)
