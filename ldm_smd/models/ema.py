"""Exponential moving average of a model's weights, saved with the checkpoint.

The shadow weights, the decay and the update counter are buffers, so they travel in the
Lightning checkpoint's ``state_dict`` and come back on resume. The effective decay warms up as
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as in CompVis's LitEma), so early samples
are not dominated by the random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
