"""Training engine: optimiser and schedule, checkpoints, distributed setup, the training loop,
evaluation, prediction, metric plots and the synthetic demo (DESIGN 5).

    from fastmaskformer.engine import Trainer
    Trainer(cfg, "runs/exp1", resume="auto").train()

Submodules load on first use, so ``fastmaskformer.engine.checkpoint`` stays light (no timm).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "CheckpointError": "checkpoint", "CheckpointManager": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "init_distributed": "distributed", "evaluate_dataset": "evaluator",
    "WarmupPoly": "optim", "TwoStageWarmupPoly": "optim", "build_lr_scheduler": "optim",
    "build_optimizer": "optim", "build_param_groups": "optim", "Predictor": "predictor", "load_image": "predictor",
    "NonFiniteLossError": "trainer", "Trainer": "trainer", "run_demo": "demo", "plot_metrics": "plot",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
