"""Pieces shared by the weight converters (``hf``, ``detectron2``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data.metadata import check_label_space, get_metadata, datasets_with


def write_checkpoint(out_path: str | os.PathLike, model: nn.Module, cfg: Config) -> None:
    """Save our checkpoint ``{"model": state_dict, "config": cfg.to_dict()}`` at ``out_path``
    atomically: the bytes go to a temporary file in the same folder, then ``os.replace`` moves it
    over the final name, so an interrupted conversion never leaves a truncated checkpoint."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_converted_classes(cfg: Config, source) -> None:
    """LabelSpaceError (one line) when the converted model's classes are not those of the config's
    dataset (a checkpoint for another dataset under this preset). Datasets without a packaged
    label space (synthetic, custom) are not checked."""
    try:
        metadata = get_metadata(cfg.data.dataset)
    except ValueError:
        return
    check_label_space(cfg.model.num_classes, metadata, f"checkpoint {source}", cfg.data.dataset)


def fitting_dataset(cfg: Config, fallback: str) -> str:
    """``cfg.data.dataset`` when its packaged label space has ``cfg.model.num_classes`` classes,
    else the first dataset whose label space has (a converted model's config names no dataset);
    ``fallback`` when none has (a name no label space has: predict then uses generic class names)."""
    try:
        if get_metadata(cfg.data.dataset).num_classes == cfg.model.num_classes:
            return cfg.data.dataset
    except ValueError:
        pass
    fits = datasets_with(cfg.model.num_classes)
    return fits[0] if fits else fallback

