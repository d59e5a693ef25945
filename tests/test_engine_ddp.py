"""DistributedDataParallel on the CPU (gloo, 2 processes): it equals one process with the
combined batch (same logged losses and weights), and with dropout a 2-process run interrupted
after a checkpoint and resumed in fresh processes ends bit-identical to an uninterrupted
2-process run (each rank must resume its own RNG stream). Spawning dominates the cost, so one
spawn trains the equality, uninterrupted and interrupted runs and a second one resumes."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from engine_tiny import tiny_config
from fastmaskformer.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastmaskformer.target import Target

ITERS = 3
STOP = 2  # checkpoint period; the interrupted run stops right after its checkpoint at STOP


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


class Interrupted(Exception):
    pass


def _trainer(out_dir, dropout: float, resume=None):
    from fastmaskformer.engine.trainer import Trainer

    cfg = tiny_config("unused", batch_size=4, max_iter=ITERS, checkpoint_period=STOP)
    cfg.model.dropout = dropout
    return Trainer(cfg, out_dir, device="cpu", train_dataset=FixedSegments(), progress=False, log_period=1,
                   deterministic=True, num_workers=0, resume=resume)


def _stop_after_checkpoint(trainer):
    """Make ``trainer.train()`` raise Interrupted once the checkpoint at iteration STOP is written."""
    step = trainer.run_step

    def run_step(data_iter):
        if trainer.iteration == STOP:
            raise Interrupted
        return step(data_iter)
    trainer.run_step = run_step


def _equality_run(out_dir):
    trainer = _trainer(out_dir, dropout=0.0)  # dropout masks differ across ranks by design
    history = trainer.train()
    return trainer, [h["total_loss"] for h in history], [h["loss_mask"] for h in history]


def _worker(rank, world_size, port, out_dir, resume):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastmaskformer.engine.distributed import cleanup

    if resume:
        _trainer(os.path.join(out_dir, "interrupted"), dropout=0.1, resume="auto").train()
    else:
        trainer, totals, masks = _equality_run(os.path.join(out_dir, "equality"))
        assert trainer.dist.world_size == world_size and trainer.micro_batch == 2
        if rank == 0:
            torch.save({"model": trainer.model.state_dict(), "totals": totals, "masks": masks},
                       os.path.join(out_dir, "ddp.pt"))
        _trainer(os.path.join(out_dir, "full"), dropout=0.1).train()
        interrupted = _trainer(os.path.join(out_dir, "interrupted"), dropout=0.1)
        _stop_after_checkpoint(interrupted)
        with pytest.raises(Interrupted):
            interrupted.train()
    cleanup()


def _spawn(out_dir, resume: bool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out_dir), resume), nprocs=2, join=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    _spawn(out_dir, resume=False)
    return out_dir


def test_ddp_two_processes_equal_single_process(runs, tmp_path):
    ddp = torch.load(runs / "ddp.pt", weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, totals, masks = _equality_run(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert single.micro_batch == 4
    assert ddp["totals"] == pytest.approx(totals, rel=1e-5)
    assert ddp["masks"] == pytest.approx(masks, rel=1e-5)
    state = single.model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_ddp_resume_with_dropout_equals_uninterrupted(runs):
    run = runs / "interrupted"
    assert sorted(p.name for p in run.glob("model_*.pt")) == [f"model_{STOP:07d}.pt"]  # stopped mid-run
    rng = load_checkpoint(run / f"model_{STOP:07d}.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one state per rank

    _spawn(runs, resume=True)
    a = load_checkpoint(runs / "full" / f"model_{ITERS:07d}.pt")
    b = load_checkpoint(run / f"model_{ITERS:07d}.pt")
    assert a["iteration"] == b["iteration"] == ITERS and a["data"] == b["data"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"])


def test_resume_refuses_another_world_size_and_a_shared_rng_state(runs, tmp_path):
    checkpoint = runs / "full" / f"model_{STOP:07d}.pt"
    with pytest.raises(CheckpointError, match=rf"{checkpoint.name} was written by 2 processes, this run has 1: .*"
                                              r"resume with 2 processes"):
        _trainer(tmp_path / "other_world", dropout=0.1, resume=checkpoint)
    # the earlier format: one RNG state for all ranks
    state = load_checkpoint(checkpoint)
    state["data"]["world_size"], state["rng"] = 1, state["rng"][0]
    shared = tmp_path / "shared_rng.pt"
    save_checkpoint(shared, state)
    with pytest.raises(CheckpointError, match="shared_rng.pt has no per-rank RNG states"):
        _trainer(tmp_path / "shared_rng", dropout=0.1, resume=shared)
