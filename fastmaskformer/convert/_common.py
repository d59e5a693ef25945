"""Pieces shared by the weight converters (``hf``, ``detectron2``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import Config


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
