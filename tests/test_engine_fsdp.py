"""FSDP2 and activation checkpointing (engine/sharding.py) on a tiny EoMT, CPU, gloo.

- 2 FSDP processes give the losses and the weights of one process with the combined batch;
  the checkpoint they write is a full state dict that a plain single-process model loads.
- A 2-process FSDP run (activation checkpointing on, mask annealing and point sampling drawing
  from their generators) interrupted after a checkpoint and resumed in fresh processes ends
  bit-identical to the uninterrupted run.
- Activation checkpointing alone gives the losses and gradients of a run without it.
As in test_engine_ddp.py, spawning dominates: one spawn trains the equality, uninterrupted and
interrupted runs, a second one resumes."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastmaskformer.config import BackboneConfig, Config, ModelConfig
from fastmaskformer.engine.checkpoint import load_checkpoint, load_model_weights
from fastmaskformer.modeling import build_model
from test_engine_ddp import FixedSegments

ITERS = 3
STOP = 2  # checkpoint period; the interrupted run stops right after its checkpoint at STOP


def eomt_config(sampled: bool, **solver) -> Config:
    """A tiny EoMT (ViT depth 4, width 32, queries in the last 2 blocks, 64 px). ``sampled``:
    mask annealing and Mask2Former's point-sampled matching and loss (per-rank generators: a
    2-process run cannot equal a single one, but resumes exactly); otherwise MaskFormer's
    deterministic full-pixel matching and focal + dice loss, masks always on."""
    annealing = ((0, 1), (3, 3)) if sampled else ((), ())
    cfg = Config(model=ModelConfig(
        meta_arch="eomt", num_classes=16, num_queries=6, num_blocks=2, mask_annealing_start=annealing[0],
        mask_annealing_end=annealing[1],
        backbone=BackboneConfig(name="dinov2_small", img_size=64,
                                kwargs=dict(depth=4, embed_dim=32, num_heads=2, mlp_ratio=2.0))))
    loss = cfg.loss
    loss.class_weight, loss.mask_weight, loss.dice_weight, loss.impl = 2.0, 5.0, 5.0, "torch"
    loss.mask_loss, loss.mask_sampling, loss.num_points = ("bce", "points", 64) if sampled else ("focal", "full", 64)
    s = cfg.solver
    s.batch_size, s.max_iter, s.checkpoint_period, s.eval_period, s.lr = 4, ITERS, STOP, 0, 1e-3
    s.lr_scheduler, s.warmup_iters, s.backbone_warmup_iters, s.layer_decay = "two_stage_poly", 1, 1, 0.8
    s.clip_grad_norm, s.keep_checkpoints, s.backbone_multiplier = 0.01, 10, 1.0
    for k, v in solver.items():
        setattr(s, k, v)
    return cfg


def _trainer(out_dir, cfg, resume=None):
    from fastmaskformer.engine.trainer import Trainer

    return Trainer(cfg, out_dir, device="cpu", train_dataset=FixedSegments(), progress=False, log_period=1,
                   deterministic=True, num_workers=0, resume=resume)


class Interrupted(Exception):
    pass


def _worker(rank, world_size, port, out_dir, resume):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastmaskformer.engine.distributed import cleanup

    sampled = eomt_config(True, fsdp=True, activation_checkpointing=True)
    if resume:
        _trainer(os.path.join(out_dir, "interrupted"), sampled, resume="auto").train()
    else:
        equal = _trainer(os.path.join(out_dir, "equality"), eomt_config(False, fsdp=True, grad_accum=2))
        history = equal.train()
        assert equal.micro_batch == 1 and equal.ddp is equal.model  # FSDP, not DDP
        if rank == 0:
            torch.save({"totals": [h["total_loss"] for h in history], "norms": [h["grad_norm"] for h in history]},
                       os.path.join(out_dir, "fsdp.pt"))
        _trainer(os.path.join(out_dir, "full"), sampled).train()
        interrupted = _trainer(os.path.join(out_dir, "interrupted"), sampled)
        step = interrupted.run_step

        def run_step(data_iter):
            if interrupted.iteration == STOP:
                raise Interrupted
            return step(data_iter)
        interrupted.run_step = run_step
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
    out_dir = tmp_path_factory.mktemp("fsdp")
    _spawn(out_dir, resume=False)
    return out_dir


def _single_process(out_dir, cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = _trainer(out_dir, cfg)
        return trainer, trainer.train()
    finally:
        torch.set_num_threads(threads)


def test_fsdp_two_processes_equal_single_process(runs, tmp_path):
    """Same losses (rel 1e-5: only the order of the gradient reductions differs) and weights
    (rtol 1e-4 after 3 AdamW steps) as one process, both accumulating 2 micro-batches (FSDP
    reduces the gradients of the last one only); the FSDP checkpoint is a plain full state dict."""
    fsdp = torch.load(runs / "fsdp.pt", weights_only=True)
    single, history = _single_process(tmp_path, eomt_config(False, grad_accum=2))
    assert single.micro_batch == 2
    assert fsdp["totals"] == pytest.approx([h["total_loss"] for h in history], rel=1e-5)
    assert fsdp["norms"] == pytest.approx([h["grad_norm"] for h in history], rel=1e-4)
    state = load_checkpoint(runs / "equality" / f"model_{ITERS:07d}.pt")
    plain = build_model(eomt_config(False).model)
    load_model_weights(plain, state["model"], "fsdp checkpoint")  # no DTensor, no FSDP wrapper names
    expected = single.model.state_dict()
    for k, v in plain.state_dict().items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    single_opt = single.optimizer.state_dict()["state"]
    for index, values in state["optimizer"]["state"].items():
        assert values["exp_avg"].shape == single_opt[index]["exp_avg"].shape and not hasattr(values["exp_avg"],
                                                                                             "full_tensor")


def test_fsdp_resume_equals_uninterrupted(runs):
    run = runs / "interrupted"
    assert sorted(p.name for p in run.glob("model_*.pt")) == [f"model_{STOP:07d}.pt"]  # stopped mid-run
    _spawn(runs, resume=True)
    a = load_checkpoint(runs / "full" / f"model_{ITERS:07d}.pt")
    b = load_checkpoint(run / f"model_{ITERS:07d}.pt")
    assert a["iteration"] == b["iteration"] == ITERS and a["data"] == b["data"]
    for k in a["model"]:
        if torch.is_tensor(a["model"][k]):
            assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["model"]["mask_annealing._extra_state"]["probs"] == b["model"]["mask_annealing._extra_state"]["probs"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"] == b["scheduler"]
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"])
        assert torch.equal(ra["mask_annealing"]["generator"], rb["mask_annealing"]["generator"])


def test_activation_checkpointing_gives_the_same_losses_and_gradients(tmp_path):
    """Recomputing the blocks repeats the same float operations: losses and weights agree to
    1e-6 relative after 3 steps (masks annealed and points sampled, the generators untouched)."""
    _, plain = _single_process(tmp_path / "plain", eomt_config(True, checkpoint_period=0))
    checkpointed, recomputed = _single_process(tmp_path / "ac", eomt_config(True, checkpoint_period=0,
                                                                           activation_checkpointing=True))
    assert checkpointed.model.backbone.activation_checkpointing
    for key in ("total_loss", "loss_mask", "loss_dice", "grad_norm"):
        assert [h[key] for h in recomputed] == pytest.approx([h[key] for h in plain], rel=1e-6), key


def test_activation_checkpointing_gradients_and_bad_use(tmp_path):
    """Gradients within 1e-6; each block really runs twice (forward, then recomputed in backward)."""
    model = build_model(eomt_config(False).model)
    images = torch.randn(2, 3, 64, 64)
    calls = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation stops early: no post hook

    def grads():
        model.zero_grad()
        calls.clear()
        out = model(images)
        (out.class_logits.square().sum() + out.mask_embed.sum() * out.pixel_embed.mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert len(calls) == 4
    model.backbone.activation_checkpointing = True
    recomputed = grads()
    assert len(calls) == 8
    with torch.no_grad():  # inference: nothing to recompute
        calls.clear()
        model(images)
        assert len(calls) == 4
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    from fastmaskformer.engine.sharding import enable_activation_checkpointing, shard_model
    from engine_tiny import tiny_config

    maskformer = build_model(tiny_config("unused").model)
    with pytest.raises(ValueError, match="solver.activation_checkpointing supports meta_arch eomt"):
        enable_activation_checkpointing(maskformer)
    with pytest.raises(ValueError, match="solver.fsdp supports meta_arch eomt"):
        shard_model(maskformer)
    with pytest.raises(ValueError, match="solver.fsdp shards the model over torchrun's processes"):
        _trainer(tmp_path, eomt_config(False, fsdp=True))
