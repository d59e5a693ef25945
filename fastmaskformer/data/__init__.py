"""Datasets, augmentation and loading (DESIGN 5).

    from fastmaskformer.data import build_dataset, build_train_loader, get_metadata
    ds = build_dataset(cfg.data, "training", train=True)     # items: see datasets.py
    loader = build_train_loader(cfg)                          # batches: see loader.collate

Names load on first use (torch, PIL), so ``fastmaskformer.data.metadata`` and
``fastmaskformer.data.prepare``'s tables stay light for the command line's argument parsing.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "synthetic": None, "transforms": None,
    "DATASETS": "catalog", "DatasetSpec": "catalog", "build_dataset": "catalog",
    "InstanceSegmentation": "datasets", "PanopticSegmentation": "datasets", "SemanticSegmentation": "datasets",
    "pair_files": "datasets", "DatasetError": "errors",
    "InferenceSampler": "loader", "TrainingSampler": "loader", "build_test_loader": "loader",
    "build_train_loader": "loader", "collate": "loader", "pad_images": "loader", "worker_init_fn": "loader",
    "LabelSpaceError": "metadata", "Metadata": "metadata", "check_label_space": "metadata",
    "get_metadata": "metadata", "datasets_with": "metadata", "list_metadata": "metadata",
    "load_metadata": "metadata", "build_augmentation": "transforms",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
        value = module if _LAZY[name] is None else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
