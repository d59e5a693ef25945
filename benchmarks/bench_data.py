"""Training data pipeline throughput (issue 6): images/s of the official ADE20K semantic
pipeline (resize 256-1024 -> 512 crop -> SSD colour jitter -> flip -> pad) through
``build_train_loader`` with N workers, on ADE-like 512x683 JPEGs generated into a temp dir.

    python benchmarks/bench_data.py [--workers 2] [--images 64] [--batches 30]

Writes ``benchmarks/results/cpu-data-<YYYY-MM-DD>.json`` and prints it. Also times the
stages of one sample in the main process (decode, augmentation, target construction).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fastmaskformer as fmf
from fastmaskformer.data import build_dataset, build_train_loader, synthetic
from fastmaskformer.data.targets import semantic_target


def make_ade_like(root: Path, n: int) -> Path:
    """Synthetic data in the ADE20K layout at 512x683, images re-encoded as JPEG like ADE."""
    synthetic.generate(root, num_train=n, num_val=0, size=(512, 683), seed=0)
    images = root / "ADEChallengeData2016/images/training"
    for png in sorted(images.glob("*.png")):
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    return root


def stage_times(ds, n: int = 20) -> dict:
    """Median ms per sample of decode / augmentation / target, single process."""
    decode, augment, target = [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        image, label = ds.load(i % len(ds))
        t1 = time.perf_counter()
        img, seg = ds.augment(image, label, np.random.default_rng(i))
        t2 = time.perf_counter()
        semantic_target(np.ascontiguousarray(seg), ds.metadata.ignore_label)
        t3 = time.perf_counter()
        decode.append(t1 - t0), augment.append(t2 - t1), target.append(t3 - t2)
    return {k: round(1e3 * float(np.median(v)), 2) for k, v in
            [("decode_ms", decode), ("augment_ms", augment), ("target_ms", target)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="distinct images generated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30, help="timed batches (after 3 warm-up)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fmf-bench-data-") as tmp:
        root = make_ade_like(Path(tmp), args.images)
        cfg = fmf.get_config("ade20k-150-r50")
        cfg.data.dataset, cfg.data.root = "synthetic-semantic", str(root)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in DataLoader workers
        stages = stage_times(build_dataset(cfg.data, "training", train=True))
        torch.set_num_threads(threads)
        loader = build_train_loader(cfg, batch_size=args.batch_size, num_workers=args.workers)
        it = iter(loader)
        for _ in range(3):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        elapsed = time.perf_counter() - start
        assert batch["images"][0].shape == (3, 512, 512)
        del it, loader

    result = {
        "benchmark": "data_pipeline_train",
        "date": datetime.date.today().isoformat(),
        "pipeline": "ADE20K semantic train (DESIGN 5), crop 512, 512x683 JPEG inputs",
        "num_workers": args.workers,
        "batch_size": args.batch_size,
        "images_timed": args.batches * args.batch_size,
        "images_per_s": round(args.batches * args.batch_size / elapsed, 2),
        "single_process_stage_median": stages,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "note": "machine shared with other jobs while measured; numbers are a lower bound",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cpu-data-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
