"""Stage-1 loss: L1 + LPIPS + KL + patch-GAN, with the adaptive discriminator weight.

The generator objective is (CompVis ``LPIPSWithDiscriminator``)::

    rec  = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)          (per pixel)
    nll  = sum(rec / exp(logvar) + logvar) / B
    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) / B + d_weight * disc_factor * (-mean D(x_rec))

with ``d_weight = disc_weight * |grad nll| / (|grad g| + 1e-4)`` taken at the decoder's last layer.
The discriminator minimises the hinge or vanilla (softplus) GAN loss. Before ``disc_start``
training steps, or with ``disc_weight = 0`` / ``disc_factor = 0``, no GAN term is computed at all.

LPIPS never downloads: its VGG16 trunk is read from the torch hub cache (see :func:`vgg16_path`),
its calibrated linear layers from the ``lpips`` package's own files. LPIPS's VGG takes RGB: a
one-channel (grayscale) image is repeated over three channels for it; the L1 term, the KL and the
discriminator (``disc_in_channels``) see the images as they are.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn.autoencoder import DiagonalGaussianDistribution
from ldm_smd.nn.discriminator import NLayerDiscriminator

VGG16_FILENAME = "vgg16-397923af.pth"
PERCEPTUAL_OFF = "model.params.lossconfig.params.perceptual_weight=0"
# torchvision vgg16 ``features`` index -> lpips slice holding it
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)),
               (5, range(23, 30)))


def vgg16_path() -> Path:
    """Where LPIPS reads its VGG16 trunk: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _missing_vgg_error(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"LPIPS needs the ImageNet VGG16 weights at {path} (not found). Put torchvision's "
        f"'{VGG16_FILENAME}' there (the directory is $TORCH_HOME/hub/checkpoints, by default "
        f"~/.cache/torch/hub/checkpoints), or train without the perceptual loss by adding the "
        f"override {PERCEPTUAL_OFF}"
    )


def build_lpips(trunk: str = "hub") -> nn.Module:
    """A frozen ``lpips.LPIPS`` (VGG) module in eval mode, built without any download.

    ``trunk`` is ``"hub"`` (read :func:`vgg16_path`), a path to a torchvision VGG16 state dict,
    or ``"random"`` (randomly initialised trunk; for tests only: its distances mean nothing).
    """
    import lpips

    path = vgg16_path() if trunk == "hub" else None if trunk == "random" else Path(trunk)
    if path is not None and not path.is_file():
        raise _missing_vgg_error(path)
    # Built on the meta device (no torchvision VGG initialisation, no download: pnet_rand and
    # pretrained=False), then materialised and filled strictly from local files.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*")
        model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    model = model.to_empty(device="cpu")
    state = {f"scaling_layer.{k}": v for k, v in lpips.ScalingLayer().state_dict().items()}
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    lins = torch.load(lin_file, map_location="cpu", weights_only=True)
    state.update(lins)  # lin{k}.* are also registered as lins.{k}.*
    state.update({f"lins.{k[3]}{k[4:]}": v for k, v in lins.items() if k.startswith("lin")})
    if path is None:
        for module in model.net.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("net.")})
    else:
        vgg = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for slice_idx, indices in _VGG_SLICES:
            for i in indices:
                for name in ("weight", "bias"):
                    key = f"features.{i}.{name}"
                    if key in vgg:
                        state[f"net.slice{slice_idx}.{i}.{name}"] = vgg[key]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"LPIPS trunk {path or 'random'}: missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}"
        )
    model.eval().requires_grad_(False)
    return model


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x_rec))]) (binary cross-entropy on logits)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class LPIPSWithDiscriminator(nn.Module):
    """Reconstruction + perceptual + KL + adversarial loss of the KL autoencoder.

    Args:
        disc_start: training step (batch count) from which the GAN terms are used.
        logvar_init: initial value of the log-variance dividing the reconstruction loss.
        learn_logvar: optimise the log-variance with the autoencoder (CompVis keeps it fixed).
        kl_weight: weight of the KL term.
        pixelloss_weight: weight of the L1 term.
        perceptual_weight: weight of LPIPS; 0 builds no LPIPS network at all.
        perceptual_trunk: ``"hub"`` (VGG16 from the torch hub cache), a file path, or
            ``"random"`` (tests only).
        disc_num_layers: stride-2 layers of the patch discriminator.
        disc_in_channels: image channels seen by the discriminator.
        disc_ndf: channels of the discriminator's first layer.
        disc_factor: multiplier of the GAN terms once active.
        disc_weight: scale of the adaptive generator GAN weight; 0 disables the GAN entirely.
        disc_loss: ``"hinge"`` or ``"vanilla"``.
    """

    def __init__(
        self,
        *,
        disc_start: int = 50001,
        logvar_init: float = 0.0,
        learn_logvar: bool = True,
        kl_weight: float = 1e-6,
        pixelloss_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_trunk: str = "hub",
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_factor: float = 1.0,
        disc_weight: float = 0.5,
        disc_loss: str = "hinge",
    ) -> None:
        super().__init__()
        losses = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
        if disc_loss not in losses:
            raise ValueError(f"disc_loss must be one of {sorted(losses)}, got {disc_loss!r}")
        self.disc_start = int(disc_start)
        self.kl_weight = float(kl_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.disc_factor = float(disc_factor)
        self.discriminator_weight = float(disc_weight)
        self.learn_logvar = bool(learn_logvar)
        self.disc_loss = losses[disc_loss]
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=learn_logvar)
        if self.perceptual_weight > 0:
            self.perceptual_loss = build_lpips(perceptual_trunk)
        self.gan_enabled = self.discriminator_weight > 0 and self.disc_factor > 0
        if self.gan_enabled:
            self.discriminator = NLayerDiscriminator(
                input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers
            )

    def train(self, mode: bool = True) -> LPIPSWithDiscriminator:
        super().train(mode)
        if hasattr(self, "perceptual_loss"):
            self.perceptual_loss.eval()  # the LPIPS network is frozen and always in eval mode
        return self

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms are used at training step ``step``."""
        return self.gan_enabled and step >= self.disc_start

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """``disc_weight * |d nll / d w| / (|d g / d w| + 1e-4)`` at ``last_layer``, clamped to
        [0, 1e4] and detached."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.linalg.vector_norm(nll_grads.float()) / (
            torch.linalg.vector_norm(g_grads.float()) + 1e-4
        )
        return weight.clamp(0.0, 1e4).detach() * self.discriminator_weight

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        *,
        step: int,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective and its parts (detached) keyed ``{split}/name``.

        ``last_layer`` (the decoder's output weight) is needed for the adaptive GAN weight in
        training; without it (validation) the GAN term is reported with weight 0.
        """
        inputs, reconstructions = inputs.float(), reconstructions.float()
        l1 = (inputs - reconstructions).abs()
        rec_loss = self.pixel_weight * l1
        logs: dict[str, torch.Tensor] = {}
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(_as_rgb(inputs), _as_rgb(reconstructions))
            rec_loss = rec_loss + self.perceptual_weight * p_loss.float()
            logs["p_loss"] = p_loss.mean()
        batch = inputs.shape[0]
        logvar = self.logvar.float()
        nll_loss = (rec_loss / torch.exp(logvar) + logvar).sum() / batch
        kl_loss = posterior.kl().float().sum() / batch
        loss = nll_loss + self.kl_weight * kl_loss
        if self.gan_active(step):
            g_loss = -self.discriminator(reconstructions).float().mean()
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            else:
                d_weight = torch.zeros((), device=inputs.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss, d_weight=d_weight)
        logs.update(
            total_loss=loss, logvar=logvar, kl_loss=kl_loss, nll_loss=nll_loss,
            rec_loss=l1.mean(), psnr=_psnr(inputs, reconstructions),
        )
        return loss, {f"{split}/{k}": v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        *,
        step: int,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator objective (0 before ``disc_start``) and its logs keyed ``{split}/name``."""
        if not self.gan_enabled:
            raise RuntimeError("discriminator_loss called with the GAN disabled (disc_weight=0)")
        logits_real = self.discriminator(inputs.detach()).float()
        logits_fake = self.discriminator(reconstructions.detach()).float()
        factor = self.disc_factor if step >= self.disc_start else 0.0
        d_loss = factor * self.disc_loss(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(),
                "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach() for k, v in logs.items()}


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` for LPIPS: a one-channel batch repeated over three channels."""
    return (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images).contiguous()


@torch.no_grad()
def _psnr(inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2), reconstructions clamped."""
    mse = (inputs - reconstructions.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()

