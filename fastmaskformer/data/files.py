"""Reading dataset files with errors that name the path: images, label maps, panoptic PNGs,
and joins that refuse to leave the dataset root."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError

ENV_ROOT = "FASTMASKFORMER_DATASETS"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def resolve_root(root=None) -> Path:
    """The datasets root: ``root`` if given, else ``$FASTMASKFORMER_DATASETS``."""
    if root is None or root == "":
        root = os.environ.get(ENV_ROOT)
        if not root:
            raise DatasetError(
                f"no dataset root: pass --data-root / set cfg.data.root, or set ${ENV_ROOT}"
            )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} does not exist or is not a directory")
    return path


def require_dir(path: Path, layout: str) -> Path:
    """``path`` if it is a directory, else a DatasetError describing the expected ``layout``."""
    if not path.is_dir():
        raise DatasetError(f"expected directory {path} not found; expected layout: {layout}")
    return path


def safe_join(root: Path, name: str, what: str = "file_name") -> Path:
    """``root / name``, refusing absolute names and ``..`` components that escape ``root``.

    The check is lexical, so datasets whose files are symlinks elsewhere still load.
    """
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, name))
    if os.path.isabs(name) or not path.startswith(base + os.sep):
        raise DatasetError(f"{what} {name!r} escapes the dataset directory {base}")
    return Path(path)


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"file {path} not found")
    try:
        img = Image.open(path)
        img.load()  # decode now: truncated or corrupt files fail here, with their path
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot decode {path}: {exc}") from exc
    return img


def read_image(path) -> np.ndarray:
    """RGB image as ``uint8 [H, W, 3]`` (EXIF orientation applied, as detectron2 does)."""
    img = ImageOps.exif_transpose(_open(Path(path)))
    return np.asarray(img.convert("RGB"))


def read_label(path) -> np.ndarray:
    """Single-channel label map ``[H, W]`` as stored: uint8 (L/P), uint16 (I;16) or int32 (I).

    Reads PNG and TIFF through PIL.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("L", "P"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        return np.asarray(img, dtype=np.int32)
    raise DatasetError(f"label map {path} has mode {img.mode}; expected one channel (L, P, I;16, I)")


def read_panoptic_ids(path) -> np.ndarray:
    """COCO panoptic PNG as segment ids ``int64 [H, W]`` (id = R + 256 G + 256^2 B)."""
    path = Path(path)
    img = _open(path)
    if img.mode != "RGB":
        raise DatasetError(f"panoptic PNG {path} has mode {img.mode}; expected RGB-encoded ids")
    rgb = np.asarray(img).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def find_image(directory: Path, stem: str) -> Path:
    """The image ``directory/stem.<ext>`` for any common image extension."""
    for ext in IMAGE_EXTENSIONS:
        path = directory / f"{stem}{ext}"
        if path.is_file():
            return path
    raise DatasetError(f"no image {directory / stem}.{{jpg,png}} for its label map")
