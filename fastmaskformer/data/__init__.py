"""Datasets, augmentation and loading (DESIGN 5).

    from fastmaskformer.data import build_dataset, build_train_loader, get_metadata
    ds = build_dataset(cfg.data, "training", train=True)     # items: see datasets.py
    loader = build_train_loader(cfg)                          # batches: see loader.collate
"""
from . import synthetic
from .catalog import DATASETS, DatasetSpec, build_dataset
from .datasets import InstanceSegmentation, PanopticSegmentation, SemanticSegmentation, pair_files
from .errors import DatasetError
from .loader import (
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    collate,
    pad_images,
    worker_init_fn,
)
from .metadata import Metadata, get_metadata, list_metadata, load_metadata
from .transforms import build_augmentation

__all__ = [
    "DATASETS", "DatasetSpec", "DatasetError", "InferenceSampler", "InstanceSegmentation", "Metadata", "PanopticSegmentation",
    "SemanticSegmentation", "TrainingSampler", "build_augmentation", "build_dataset", "build_test_loader",
    "build_train_loader", "collate", "get_metadata", "list_metadata", "load_metadata", "pad_images",
    "pair_files", "synthetic", "worker_init_fn",
]
