"""Checkpoints that survive kills and load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and primitive containers only::

    model        state_dict of the (unwrapped) model
    config       Config.to_dict()
    iteration    int: optimiser steps done
    optimizer, scheduler   their state_dicts (the schedule lambda stores plain fields)
    rng          one {"python": [...], "numpy": [...], "torch": uint8 tensor, "cuda": [tensors]}
                 per rank, indexed by rank (see ``capture_rng_state``)
    data         {"samples": samples drawn by each rank's sampler, "seed", "world_size"}

Writes are atomic: the bytes go to a temporary file in the destination folder, are fsync'ed,
then ``os.replace`` moves it over the final name, and the folder is fsync'ed. A kill at any
moment leaves either the old file or the complete new one, never a truncated checkpoint under a
checkpoint name. ``CheckpointManager`` names files ``model_{iteration:07d}.pt``, records the
newest in ``last_checkpoint`` (also atomically) and keeps the last N.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not one of ours. The message names the path."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync, rename over
    ``path``, fsync the folder. On any failure the temporary file is removed and ``path`` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically ``torch.save`` a dict of tensors / primitives to ``path``."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Raises CheckpointError when the file is missing, truncated/corrupt, holds objects other
    than tensors and primitive containers, or is not a dict with a ``model`` state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:
            raise CheckpointError(f"checkpoint {path} holds a Python object ({found.group(1)}), not only tensors "
                                  "and plain containers; refusing to unpickle it (weights_only)") from exc
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint") from exc
    except Exception as exc:  # a damaged archive fails in many ways (zip, pickle memo, storage sizes)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({first})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} is not a fastmaskformer checkpoint (no 'model' state_dict)")
    return state


def load_model_weights(model: torch.nn.Module, weights: dict, path: str | os.PathLike, hint: str = "") -> None:
    """``model.load_state_dict(weights)``; a mismatch (another architecture or size) is a
    CheckpointError naming ``path`` and the first mismatching tensor, plus ``hint``."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first mismatching key
        raise CheckpointError(f"checkpoint {path} does not fit the model config ({detail}){hint}") from exc


# ----------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) global RNG states as tensors / lists / ints."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------- manager
class CheckpointManager:
    """``model_{iteration:07d}.pt`` files in ``directory``, newest recorded in ``last_checkpoint``,
    only the newest ``keep`` kept (``keep <= 0``: keep all)."""

    POINTER = "last_checkpoint"

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = Path(directory)
        self.keep = int(keep)

    def path_for(self, iteration: int) -> Path:
        return self.directory / f"model_{iteration:07d}.pt"

    def save(self, iteration: int, state: dict) -> Path:
        path = self.path_for(iteration)
        save_checkpoint(path, state)
        atomic_write(self.directory / self.POINTER, lambda f: f.write(path.name.encode()))
        self._prune()
        return path

    def list(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.directory.glob("model_[0-9]*.pt"))

    def latest(self) -> Path | None:
        """The newest checkpoint named by ``last_checkpoint`` (falling back to the newest file)."""
        pointer = self.directory / self.POINTER
        if pointer.is_file():
            candidate = self.directory / pointer.read_text().strip()
            if candidate.is_file():
                return candidate
        files = self.list()
        return files[-1] if files else None

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)


def resolve_resume(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume`` semantics: None -> no resume; "auto" -> the newest checkpoint in
    ``output_dir`` (None when there is none); a path (file, or a run folder) -> that checkpoint.

    Raises CheckpointError when an explicit path has no checkpoint.
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        return CheckpointManager(output_dir).latest()
    path = Path(resume)
    if path.is_dir():
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise CheckpointError(f"no checkpoint (model_*.pt) in {path}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    return path


def previous_checkpoint(path: Path) -> Path | None:
    """The checkpoint written before ``path`` in the same folder, if any (for error hints)."""
    older = [p for p in CheckpointManager(path.parent).list() if p.name < path.name]
    return older[-1] if older else None
