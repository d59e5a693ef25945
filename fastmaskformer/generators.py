"""Seeded random streams owned by modules (the point-sampling criterion, EoMT's mask annealing)
whose state travels in the module's state dict, so ``--resume`` continues the same draws."""
from __future__ import annotations

import torch


def generator_on(owner, device) -> torch.Generator:
    """``owner.generator`` on the device type of ``device``: made from ``owner.seed`` (then set to
    ``owner._pending_state``, a state restored before the device was known) when it is missing or
    lives on another device type."""
    device = torch.device(device)
    if owner.generator is None or owner.generator.device.type != device.type:
        owner.generator = torch.Generator(device=device).manual_seed(owner.seed)
        if owner._pending_state is not None:
            owner.generator.set_state(owner._pending_state)
            owner._pending_state = None
    return owner.generator
