"""Exponential moving average of a model's weights, saved with the checkpoint.

The shadow weights, the decay and the update counter are buffers, so they travel in the
Lightning checkpoint's ``state_dict`` and come back on resume. The effective decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as in CompVis's LitEma), so early samples
are not dominated by the random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ldm_smd.checkpoints import CheckpointError


class EMA(nn.Module):
    """Shadow copy of ``model``'s trainable parameters.

    Args:
        model: the network whose parameters are averaged.
        decay: the target decay in (0, 1).
    """

    def __init__(self, *, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.register_buffer("decay", torch.tensor(float(decay), dtype=torch.float64))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self._names: dict[str, str] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                buffer_name = name.replace(".", "__")
                self._names[name] = buffer_name
                self.register_buffer(buffer_name, param.detach().clone())

    def _shadow(self, name: str) -> torch.Tensor:
        return getattr(self, self._names[name])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s current weights."""
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(float(self.decay), (1.0 + n) / (10.0 + n))
        params = [(self._shadow(k), p) for k, p in model.named_parameters() if k in self._names]
        shadows = [s for s, _ in params]
        torch._foreach_lerp_(shadows, [p.detach().to(s.dtype) for s, p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the shadow weights."""
        for name, param in model.named_parameters():
            if name in self._names:
                param.copy_(self._shadow(name))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model`` carries the EMA weights; its own come back afterwards."""
        saved = {k: p.detach().clone() for k, p in model.named_parameters() if k in self._names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in saved:
                        param.copy_(saved[name])


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
