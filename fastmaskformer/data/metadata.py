"""Class names, category ids, thing/stuff flags and colours of each dataset.

The facts live in ``fastmaskformer/data/metadata/<name>.json`` (package data), one file per
label space::

    {"name": "ade20k-150", "ignore_label": 255,
     "classes": [{"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]}, ...]}

``id`` is the category id as stored in the dataset's files (COCO panoptic ids are not
contiguous); the list order is the contiguous training id ``[0, K)``. Synthetic datasets carry
the same schema in ``<root>/synthetic_metadata.json`` (see ``fastmaskformer.data.synthetic``).

Sources: class names, ids, flags and colours as in the MaskFormer/detectron2 registrations.
ADE20K-150 semantic carries the ADE20K panoptic thing/stuff split; ADE20K-Full-847 has no
split (all stuff) and, like the 91 COCO-Stuff stuff classes, no official colours: theirs are
a fixed generated palette. Mapillary's ignore label is 65 ("unlabeled"). COCO instance: the 80
thing classes of COCO panoptic (detectron2's order = ascending COCO category id). Cityscapes
panoptic: the 19 train classes (contiguous id = train id) with their Cityscapes label ids
(7..33, what ``createPanopticImgs`` writes as ``category_id``), things = person ... bicycle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import DatasetError
from .files import resolve_root

METADATA_DIR = Path(__file__).resolve().parent / "metadata"
SYNTHETIC_METADATA = "synthetic_metadata.json"

# dataset name -> the label space (metadata file) it uses
_LABEL_SPACES = {
    "ade20k-150": "ade20k-150",
    "ade20k-full-847": "ade20k-full-847",
    "coco-stuff-10k": "coco-stuff-171",
    "coco-stuff-171": "coco-stuff-171",
    "cityscapes": "cityscapes-19",
    "cityscapes-19": "cityscapes-19",
    "mapillary": "mapillary-65",
    "mapillary-65": "mapillary-65",
    "coco-panoptic": "coco-panoptic-133",
    "coco-panoptic-133": "coco-panoptic-133",
    "ade20k-panoptic": "ade20k-panoptic-150",
    "ade20k-panoptic-150": "ade20k-panoptic-150",
    "coco-instance": "coco-instance-80",
    "coco-instance-80": "coco-instance-80",
    "cityscapes-panoptic": "cityscapes-panoptic-19",
    "cityscapes-panoptic-19": "cityscapes-panoptic-19",
}
SYNTHETIC_NAMES = ("synthetic-semantic", "synthetic-panoptic")


@dataclass(frozen=True)
class Metadata:
    """One label space. Index ``k`` of every tuple describes contiguous class ``k``."""

    name: str
    class_names: tuple
    dataset_ids: tuple  # category id in the dataset's files, per contiguous class
    isthing: tuple  # bool per class
    colors: tuple  # (r, g, b) per class
    ignore_label: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def thing_classes(self) -> tuple:
        """Contiguous ids of the thing classes."""
        return tuple(k for k, t in enumerate(self.isthing) if t)

    @property
    def stuff_classes(self) -> tuple:
        return tuple(k for k, t in enumerate(self.isthing) if not t)

    @property
    def category_map(self) -> dict:
        """Dataset category id -> contiguous id."""
        return {cid: k for k, cid in enumerate(self.dataset_ids)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Metadata":
        try:
            classes = d["classes"]
            meta = cls(
                name=str(d["name"]),
                class_names=tuple(str(c["name"]) for c in classes),
                dataset_ids=tuple(int(c["id"]) for c in classes),
                isthing=tuple(bool(c["isthing"]) for c in classes),
                colors=tuple(tuple(int(v) for v in c["color"]) for c in classes),
                ignore_label=int(d["ignore_label"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                f"metadata {source} is malformed ({exc!r}); expected "
                '{"name", "ignore_label", "classes": [{"id", "name", "isthing", "color"}]}'
            ) from exc
        if len(set(meta.dataset_ids)) != meta.num_classes:
            raise DatasetError(f"metadata {source} has duplicate category ids")
        return meta

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "ignore_label": self.ignore_label,
            "classes": [
                {"id": i, "name": n, "isthing": int(t), "color": list(c)}
                for i, n, t, c in zip(self.dataset_ids, self.class_names, self.isthing, self.colors)
            ],
        }


def load_metadata(path) -> Metadata:
    """Read a metadata JSON file (schema in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"metadata file {path} not found")
    with open(path) as f:
        return Metadata.from_dict(json.load(f), source=str(path))


@lru_cache(maxsize=None)
def _packaged(label_space: str) -> Metadata:
    return load_metadata(METADATA_DIR / f"{label_space}.json")


def list_metadata() -> list:
    """Names ``get_metadata`` accepts without a root."""
    return sorted(_LABEL_SPACES)


def get_metadata(name: str, root=None) -> Metadata:
    """Metadata of a dataset or label space, e.g. ``get_metadata("ade20k-150").class_names``.

    The synthetic datasets keep theirs next to the data: pass the dataset ``root`` the generator
    wrote (or set ``$FASTMASKFORMER_DATASETS``).
    """
    if name in SYNTHETIC_NAMES:
        return load_metadata(resolve_root(root) / SYNTHETIC_METADATA)
    if name not in _LABEL_SPACES:
        raise ValueError(
            f"unknown dataset metadata {name!r}; choose one of: "
            f"{', '.join(list_metadata() + list(SYNTHETIC_NAMES))}"
        )
    return _packaged(_LABEL_SPACES[name])


class LabelSpaceError(ValueError):
    """A model's number of classes differs from the label space it is used with (one line)."""


def datasets_with(num_classes: int) -> list:
    """Dataset names (``data.dataset``) whose packaged label space has ``num_classes`` classes,
    without the longer aliases (``coco-panoptic``, not also ``coco-panoptic-133``)."""
    names = sorted(n for n, space in _LABEL_SPACES.items() if _packaged(space).num_classes == num_classes)
    return [n for n in names if not any(n != m and n.startswith(m + "-") and _LABEL_SPACES[n] == _LABEL_SPACES[m]
                                        for m in names)]


def check_label_space(num_classes: int | None, metadata: Metadata, source: str, dataset: str | None = None) -> None:
    """Raise :class:`LabelSpaceError` when a model predicting ``num_classes`` classes is used with
    ``metadata`` of another size (class ids would index past its names, colours and thing flags,
    or leave classes unnamed). ``source`` names the model in the message ("checkpoint run/x.pt");
    ``dataset``: the config's dataset name (default: the label space's). ``None`` classes: not
    known (an exported program), nothing to check."""
    if num_classes is None or int(num_classes) == metadata.num_classes:
        return
    name = dataset or metadata.name
    space = "" if name == metadata.name else f" (label space {metadata.name})"
    fits = datasets_with(int(num_classes))
    hint = (f"the model fits {', '.join(fits)}: use its preset or --set data.dataset={fits[0]}" if fits else
            f"no packaged label space has {num_classes} classes: use the config the model was trained with "
            "(a checkpoint's own: no --preset / --config / data.dataset override)")
    raise LabelSpaceError(f"{source} has {num_classes} classes but dataset {name}{space} has "
                          f"{metadata.num_classes}; {hint}")
