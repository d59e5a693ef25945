"""What every dataset preparation shares: checking ``--src``, atomic writes, the parallel loop.

Atomic: every output is written to a hidden temporary file in its final folder and moved over
its final name with ``os.replace``, so an interrupted run never leaves a half-written file under
a final name; a re-run skips every output that exists and so resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import DatasetError

TABLES = Path(__file__).resolve().parent / "ade20k_tables.json"


class PrepareError(DatasetError):
    """A missing or malformed raw input; the message is one line naming the file."""


@lru_cache(maxsize=None)
def _tables_text() -> str:
    return TABLES.read_text()


def ade20k_tables() -> dict:
    """The ADE20K label tables (a fresh copy each call: callers may modify it)."""
    return json.loads(_tables_text())


# ----------------------------------------------------------------------------- inputs
def require(path: Path, what: str, download: str) -> Path:
    """``path`` if it exists, else a PrepareError naming it, what it is and where it comes from."""
    if not path.exists():
        raise PrepareError(f"{path} not found ({what}; {download})")
    return path


def open_image(path: Path) -> Image.Image:
    """A fully decoded PIL image, or a PrepareError naming the file."""
    if not path.is_file():
        raise PrepareError(f"{path} not found")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise PrepareError(f"cannot decode {path}: {exc}") from exc
    return img


def read_array(path: Path) -> np.ndarray:
    """``np.asarray(Image.open(path))`` as the official scripts read their inputs (no EXIF
    rotation, no mode conversion), with errors that name the file."""
    return np.asarray(open_image(path))


# ----------------------------------------------------------------------------- outputs
def _temporary(final: Path) -> Path:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise PrepareError(f"cannot write into {final.parent}: {exc}") from exc
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, final: Path, write: Callable[[Path], None]) -> None:
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError as exc:  # disk full, permissions, a mode the format cannot hold (CMYK JPEG ...)
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"cannot write {final}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_image(array: np.ndarray, final: Path, fmt: str) -> None:
    """``Image.fromarray(array).save(final)`` (the official scripts' call, PIL defaults for
    ``fmt``: JPEG quality 75, PNG, TIFF), atomically."""
    image = Image.fromarray(array)
    _commit(_temporary(final), final, lambda tmp: image.save(tmp, format=fmt))


def save_pil(image: Image.Image, final: Path, fmt: str) -> None:
    _commit(_temporary(final), final, lambda tmp: image.save(tmp, format=fmt))


def copy_file(src: Path, final: Path) -> None:
    """Byte copy (``shutil.copyfile``), atomically."""
    _commit(_temporary(final), final, lambda tmp: shutil.copyfile(src, tmp))


def write_json(data, final: Path) -> None:
    """``json.dump(data, f)`` with the defaults (what panopticapi's ``save_json`` writes), atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f)
    _commit(_temporary(final), final, write)


def link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` show the raw folder ``src`` (a symlink) when preparing into another root."""
    if dst.exists() or dst.is_symlink():
        return
    if src.resolve() == dst.resolve():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst, target_is_directory=True)


# ----------------------------------------------------------------------------- the loop
def run_parallel(fn: Callable, tasks: Sequence, jobs: int, desc: str, progress: bool) -> list:
    """``[fn(*t) for t in tasks]`` on ``jobs`` processes (1: in this process), with a tqdm bar.

    The first failure stops the run: pending tasks are cancelled, finished outputs stay (they
    are complete files), and the error is raised here.
    """
    from tqdm import tqdm

    results: list = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress or not tasks, leave=True)
    try:
        if jobs <= 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                results[i] = fn(*t)
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(fn, *t): i for i, t in enumerate(tasks)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        for other in pending:
                            other.cancel()
                        raise exc
                    results[futures[fut]] = fut.result()
                    bar.update()
        return results
    finally:
        bar.close()


def default_jobs() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def missing(paths: Iterable[Path]) -> bool:
    return any(not p.is_file() for p in paths)
