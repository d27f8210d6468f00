"""The EMA of the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_smd.models.ema import EMA


@pytest.mark.parametrize(("decay", "updates", "gap"), [
    (0.9, 3, (2 / 11) * (3 / 12) * (4 / 13)),  # warm-up only: (1 + n) / (10 + n) < 0.9
    (0.3, 5, (2 / 11) * (3 / 12) * 0.3**3),  # the decay caps the warm-up from update 3 on
])
def test_ema_decay_and_warm_up_are_pinned(decay, updates, gap):
    # update n moves the shadow by 1 - min(decay, (1 + n) / (10 + n)) of the way (CompVis)
    net = nn.Linear(3, 1)
    ema = EMA(model=net, decay=decay)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)  # the target is start + 1: the shadow's gap is the decays' product
    for _ in range(updates):
        ema.update(net)
    torch.testing.assert_close(ema.weight, start + 1.0 - gap, atol=1e-7, rtol=0)


def test_ema_tracks_weights_and_state_round_trips():
    net = nn.Linear(3, 1)
    ema = EMA(model=net, decay=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(300):
        ema.update(net)
    assert torch.allclose(ema.weight, net.weight, atol=1e-6)
    with torch.no_grad():
        net.weight.copy_(start)
    with ema.swapped_in(net):
        assert torch.allclose(net.weight, start + 1.0, atol=1e-6)
    assert torch.equal(net.weight, start)
    other = EMA(model=nn.Linear(3, 1), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 300 and torch.equal(other.weight, ema.weight)
    assert float(other.decay) == 0.9  # the decay travels with the state
    with pytest.raises(ValueError, match="decay"):
        EMA(model=net, decay=1.5)
