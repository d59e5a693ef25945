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

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, or not one of ours. The message names the path."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; the message says why and what is still intact."""


class RunFolderError(CheckpointError):
    """A new run was pointed at a folder that holds another run (one line naming the way out)."""


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
        """Write ``state`` as the checkpoint of ``iteration``, then point ``last_checkpoint`` at it.
        A failed write (disk full, read-only or vanished folder) raises CheckpointWriteError, one
        line, and leaves the previous checkpoint and ``last_checkpoint`` as they were."""
        path = self.path_for(iteration)
        if not self.directory.is_dir():  # never recreate a run folder removed or unmounted mid-run
            raise CheckpointWriteError(f"could not write checkpoint {path}: the output folder {self.directory} no "
                                       "longer exists (removed or unmounted during the run)")
        try:
            save_checkpoint(path, state)
            atomic_write(self.directory / self.POINTER, lambda f: f.write(path.name.encode()))
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
            raise CheckpointWriteError(self._write_failure(path, state, exc)) from exc
        self._prune()
        return path

    def _write_failure(self, path: Path, state: dict, exc: BaseException) -> str:
        """One line: the file, why, about how much space it needs, and what is still intact."""
        needed = _tensor_bytes(state)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = None
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < needed):
            why = "the disk is full"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
            why = f"the output folder {self.directory} is read-only"
        else:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        space = f"it needs about {_megabytes(needed)}"
        if free is not None:
            space += f", {_megabytes(free)} free there"
        previous = self.latest()
        if previous is not None and previous != path:
            after = (f"the previous checkpoint {previous} and {self.POINTER} are intact: fastmaskformer train "
                     f"--resume continues from it once the checkpoint can be written")
        else:
            after = "no earlier checkpoint of this run exists"
        return f"could not write checkpoint {path}: {why} ({space}); {after}"

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


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict / list (about a checkpoint's size on disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


RUN_FILES = ("config.yaml", "metrics.jsonl", CheckpointManager.POINTER, "curves.png", "tensorboard")


def previous_run(output_dir: str | os.PathLike) -> list[Path]:
    """What a training run left in ``output_dir``: checkpoints and ``RUN_FILES`` (empty: none)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return CheckpointManager(folder).list() + [folder / n for n in RUN_FILES if (folder / n).exists()]


def claim_run_folder(output_dir: str | os.PathLike, force: bool, other_ways: str) -> None:
    """Make ``output_dir`` ready for a new run: refuse (RunFolderError naming ``other_ways`` and
    --force) when it holds another run, or with ``force`` delete that run's files first, so two
    runs never mix their checkpoints and metrics."""
    found = previous_run(output_dir)
    if found and not force:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise RunFolderError(f"{output_dir} holds a previous run ({names}); {other_ways} or --force to replace it")
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


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
