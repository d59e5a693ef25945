"""DistributedDataParallel on the CPU (gloo, 2 processes) equals one process with the combined
batch: same logged losses and the same weights after a few iterations."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from engine_tiny import tiny_config
from fastmaskformer.target import Target

ITERS = 3


class FixedSegments(Dataset):
    """64x64 images with exactly three segments each: the class loss is a weighted mean whose
    weight sum depends on the number of GT segments, so equal counts per image make the mean of
    the per-rank losses equal to the loss of the combined batch."""

    def __len__(self):
        return 8

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        g = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)
        cut = 16 + 4 * index
        seg = torch.full((64, 64), -1, dtype=torch.int32)
        seg[:cut] = 0
        seg[cut:, :40] = 1
        seg[cut:, 44:] = 2
        labels = torch.tensor([index % 16, (index + 3) % 16, (index + 9) % 16])
        return {"image": image, "target": Target(labels, seg)}


def _config():
    cfg = tiny_config("unused", batch_size=4, max_iter=ITERS, checkpoint_period=0)
    cfg.model.dropout = 0.0  # dropout masks differ across ranks by design
    return cfg


def _train(out_dir):
    from fastmaskformer.engine.trainer import Trainer

    trainer = Trainer(_config(), out_dir, device="cpu", train_dataset=FixedSegments(), progress=False,
                      log_period=1, deterministic=True, num_workers=0)
    history = trainer.train()
    return trainer, [h["total_loss"] for h in history], [h["loss_mask"] for h in history]


def _worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastmaskformer.engine.distributed import cleanup

    trainer, totals, masks = _train(out_dir)
    assert trainer.dist.world_size == world_size and trainer.micro_batch == 2
    if rank == 0:
        torch.save({"model": trainer.model.state_dict(), "totals": totals, "masks": masks},
                   os.path.join(out_dir, "ddp.pt"))
    cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, totals, masks = _train(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    assert single.micro_batch == 4
    assert ddp["totals"] == pytest.approx(totals, rel=1e-5)
    assert ddp["masks"] == pytest.approx(masks, rel=1e-5)
    state = single.model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
