"""Shared fixtures of the engine and CLI tests: a tiny MaskFormer config (about 0.25 M
parameters, 64 px crops) on a tiny synthetic dataset. Not a test module."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "preset": "ade20k-150-r50",
    "model": {
        "backbone": {"name": "resnet18", "kwargs": {"channels": [8, 16, 32, 64]}},
        "num_classes": 16, "num_queries": 6, "hidden_dim": 16, "mask_dim": 16, "conv_dim": 32,
        "nheads": 2, "dim_feedforward": 32, "dec_layers": 2, "dropout": 0.1,
    },
    "data": {
        "dataset": "synthetic-semantic", "crop_size": [64, 64], "min_size_test": 64, "max_size_test": 256,
        "num_workers": 0, "color_jitter": False,
    },
    "solver": {"batch_size": 4, "max_iter": 6, "checkpoint_period": 2, "eval_period": 0, "lr": 1e-3,
               "keep_checkpoints": 10},
}


def tiny_config(data_root, **solver):
    """A ``Config`` of the tiny setup on ``data_root``; ``solver`` overrides solver fields."""
    from fastmaskformer.config import Config

    cfg = Config.from_yaml(yaml.safe_dump(TINY))
    cfg.data.root = str(data_root)
    for k, v in solver.items():
        setattr(cfg.solver, k, v)
    return cfg


def as_mask2former(cfg):
    """Turn a tiny config's model into a tiny Mask2Former (deformable pixel decoder with one
    encoder layer, 3 predictions, official loss weights on 64 points, torch ops); returns cfg."""
    m = cfg.model
    m.meta_arch, m.pixel_decoder, m.dec_layers, m.dropout = "mask2former", "msdeformattn", 3, 0.0
    m.conv_dim = m.hidden_dim = 32  # GroupNorm(32) in the deformable pixel decoder
    m.pixel_decoder_kwargs = {"enc_layers": 1, "nheads": 2, "dim_feedforward": 32}
    m.backbone.kwargs = {"channels": [16, 16, 32, 32]}
    cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight = 2.0, 5.0, 5.0
    cfg.loss.mask_loss, cfg.loss.mask_sampling, cfg.loss.num_points = "bce", "points", 64
    cfg.loss.impl = "torch"
    return cfg


def write_tiny_yaml(path, **solver) -> Path:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    data["solver"] = {**TINY["solver"], **solver}
    Path(path).write_text(yaml.safe_dump(data))
    return Path(path)


def make_data(root, num_train: int = 12, num_val: int = 3):
    from fastmaskformer.data import synthetic

    return synthetic.generate(root, num_train=num_train, num_val=num_val, size=64, seed=0)


def cli_env() -> dict:
    """Environment of CLI subprocesses: one thread (the CI box is shared), no Triton on CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def cli_command(*args) -> list:
    return [sys.executable, "-m", "fastmaskformer.cli", *map(str, args)]


def run_cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), cwd=REPO,
                          timeout=timeout)
