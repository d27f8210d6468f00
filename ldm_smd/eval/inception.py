"""Inception-v3 with the FID feature definition (pytorch-fid / TTUR), weights from a local file.

The FID literature computes features with the 2015 TensorFlow Inception graph. Its PyTorch port
(weights file ``pt_inception-2015-12-05-6726825d.pth``) differs from torchvision's Inception-v3
in four blocks, reproduced here on top of torchvision's ``Inception3`` (built with random
weights, then loaded strictly from the file):

- ``Mixed_5b/5c/5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E, first): the pooling branch
  averages over valid pixels only (``count_include_pad=False``), as TensorFlow does;
- ``Mixed_7c`` (E, second): the pooling branch is a 3x3 *max* pool (a quirk of the TF graph);
- the classifier has 1008 outputs (unused; kept so that the file loads strictly).

Input: RGB in ``[0, 1]``, any size, resized to 299x299 with bilinear interpolation
(``align_corners=False``, no antialiasing), then scaled to ``[-1, 1]``. Output: the 2048-d
pool3 features (global average pool after ``Mixed_7c``).

The weights are never downloaded. They are looked up at, in order: the ``weights_path``
argument, the environment variable ``LDM_SMD_INCEPTION_WEIGHTS``, and the torch hub cache
``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``
(``TORCH_HOME`` defaults to ``~/.cache/torch``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv_inception

from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.errors import LdmSmdError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "LDM_SMD_INCEPTION_WEIGHTS"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
)
FEATURE_DIM = 2048
INPUT_SIZE = 299


class InceptionWeightsMissing(LdmSmdError, FileNotFoundError):
    """The FID Inception weights file is not on disk."""


class InceptionWeightsError(LdmSmdError, ValueError):
    """The FID Inception weights file is not the pytorch-fid state dict."""


def default_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints" / WEIGHTS_NAME


def resolve_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file to use (argument, then env var, then hub cache); error if absent."""
    if weights_path is not None:
        path, origin = Path(weights_path), "the weights_path argument / --inception-weights"
    elif os.environ.get(WEIGHTS_ENV):
        path, origin = Path(os.environ[WEIGHTS_ENV]), f"${WEIGHTS_ENV}"
    else:
        path, origin = default_weights_path(), "the torch hub cache (default)"
    if not path.is_file():
        raise InceptionWeightsMissing(
            f"FID Inception weights not found: {path} (from {origin}).\n"
            f"  The file is {WEIGHTS_NAME} (the pytorch-fid port of the 2015 TF Inception); "
            f"nothing is downloaded at run time.\n"
            f"  Get it once from {WEIGHTS_URL}\n"
            f"  and put it at {default_weights_path()}, or point ${WEIGHTS_ENV} or "
            f"--inception-weights at it.\n"
            f"  FID, KID and precision/recall need it; `ldm-smd bench-mixture` (exact metrics on "
            f"Gaussian mixtures) does not."
        )
    return path


def _pool_exclude_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _pool_max(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _FIDInceptionA(tv_inception.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool_exclude_pad(x))
        return [b1, b5, b3, bp]


class _FIDInceptionC(tv_inception.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (
            self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
            self.branch7x7dbl_4, self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(_pool_exclude_pad(x))
        return [b1, b7, bd, bp]


class _FIDInceptionE(tv_inception.InceptionE):
    """Block E with a configurable pooling branch (exclude-pad average, or max for Mixed_7c)."""

    def __init__(self, in_channels: int, *, max_pool: bool = False) -> None:
        super().__init__(in_channels)
        self._pool = _pool_max if max_pool else _pool_exclude_pad

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(self._pool(x))
        return [b1, b3, bd, bp]


def build_fid_inception() -> tv_inception.Inception3:
    """The FID variant of Inception-v3 with random weights (load a state dict into it)."""
    net = tv_inception.Inception3(
        num_classes=1008, aux_logits=False, transform_input=False, init_weights=False
    )
    net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _FIDInceptionE(1280)
    net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
    return net


class FIDInception(nn.Module):
    """Pool3 (2048-d) feature extractor of the FID Inception network.

    Args:
        weights_path: the ``pt_inception-2015-12-05-6726825d.pth`` file; ``None`` looks at
            ``$LDM_SMD_INCEPTION_WEIGHTS``, then the torch hub cache (module docstring).
    """

    def __init__(self, *, weights_path: str | None = None) -> None:
        super().__init__()
        path = resolve_weights_path(weights_path)
        self.weights_path = str(path)
        net = build_fid_inception()
        try:
            state = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            raise InceptionWeightsError(
                f"FID Inception weights: {exc} (expected {WEIGHTS_NAME} from {WEIGHTS_URL})"
            ) from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise InceptionWeightsError(
                f"{path}: expected a state dict, got {type(state).__name__}"
            )
        expected = net.state_dict()
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise InceptionWeightsError(
                f"{path} is not the FID Inception state dict: missing keys {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                f"{'...' if len(unexpected) > 8 else ''}"
            )
        net.load_state_dict(state, strict=False)
        self.blocks = nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3,
            nn.MaxPool2d(kernel_size=3, stride=2),
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
            net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
            net.Mixed_7a, net.Mixed_7b, net.Mixed_7c,
            nn.AdaptiveAvgPool2d(1),
        )
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``(N, 3, H, W)`` float RGB in ``[0, 1]``; returns ``(N, 2048)`` float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInception: expected (N, 3, H, W), got {tuple(images.shape)}")
        x = images.to(torch.float32)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        x = 2.0 * x - 1.0
        return self.blocks(x).flatten(1)
