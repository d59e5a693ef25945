"""Optimiser parameter groups, the warmup + poly and warmup + multi-step schedules and
full-model clipping (DESIGN 5)."""
import math

import pytest
import torch
from torch import nn

from fastmaskformer.config import SolverConfig
from fastmaskformer.engine.optim import (
    WarmupMultiStep,
    WarmupPoly,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    clip_grad_norm,
)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.backbone.add_module("frozen", nn.BatchNorm2d(4))
        self.backbone.frozen.requires_grad_(False)
        self.decoder = nn.Sequential(nn.Conv2d(4, 32, 1), nn.GroupNorm(32, 32), nn.LayerNorm(32))
        self.query_embed = nn.Embedding(5, 8)
        self.head = nn.Linear(8, 3)


def _groups(solver):
    return {g["name"]: g for g in build_param_groups(_Toy(), solver)}


def test_param_groups_official():
    solver = SolverConfig(lr=1e-4, weight_decay=1e-4, backbone_multiplier=0.1)
    model = _Toy()
    groups = {g["name"]: g for g in build_param_groups(model, solver)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert members == {
        "backbone/decay": ["backbone.0.bias", "backbone.0.weight", "backbone.2.bias", "backbone.2.weight"],
        "backbone/norm": ["backbone.1.bias", "backbone.1.weight"],
        "head/decay": ["decoder.0.bias", "decoder.0.weight", "head.bias", "head.weight"],
        "head/norm": ["decoder.1.bias", "decoder.1.weight", "decoder.2.bias", "decoder.2.weight"],
        "head/embed": ["query_embed.weight"],
    }
    assert groups["backbone/decay"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone/norm"]["lr"] == pytest.approx(1e-5)
    assert groups["head/decay"]["lr"] == pytest.approx(1e-4)
    assert groups["head/decay"]["weight_decay"] == 1e-4 and groups["backbone/decay"]["weight_decay"] == 1e-4
    for name in ("backbone/norm", "head/norm", "head/embed"):
        assert groups[name]["weight_decay"] == 0.0
    # every trainable parameter exactly once; frozen ones never
    listed = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable)


def test_param_groups_swin_style_and_optimizer():
    solver = SolverConfig(lr=6e-5, weight_decay=0.01, backbone_multiplier=1.0)
    opt = build_optimizer(_Toy(), solver)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {6e-5}


def test_real_model_groups():
    from fastmaskformer import get_config
    from fastmaskformer.modeling import build_model

    cfg = get_config("ade20k-150-r50")
    m = cfg.model
    m.backbone.kwargs = {"channels": [8, 16, 32, 64]}
    m.num_queries, m.hidden_dim, m.mask_dim, m.conv_dim, m.dim_feedforward, m.nheads, m.dec_layers = 4, 16, 16, 32, 32, 2, 1
    model = build_model(m)
    groups = {g["name"]: g for g in build_param_groups(model, cfg.solver)}
    embed = [p for p in groups["head/embed"]["params"]]
    assert any(p is model.predictor.query_embed.weight for p in embed)
    norm_ids = {id(p) for p in groups["head/norm"]["params"]}
    gn = next(mod for mod in model.pixel_decoder.modules() if isinstance(mod, nn.GroupNorm))
    assert id(gn.weight) in norm_ids
    # frozen BN of the backbone has no parameters; every backbone conv is in the backbone group
    assert all(n.startswith("backbone.") for n, p in model.named_parameters()
               if any(p is q for q in groups["backbone/decay"]["params"]))


@pytest.mark.parametrize("warmup_iters,factor", [(0, 1.0), (10, 0.001), (1500, 1e-6)])
def test_warmup_poly_values(warmup_iters, factor):
    max_iter = 2000
    f = WarmupPoly(max_iter, 0.9, warmup_iters, factor)
    for it in (0, 1, 5, 9, 10, 100, 1499, 1500, 1999, 2000):
        alpha = it / warmup_iters if it < warmup_iters else 1.0
        warm = factor * (1 - alpha) + alpha if it < warmup_iters else 1.0
        assert f(it) == pytest.approx(warm * (1 - it / max_iter) ** 0.9, rel=1e-12, abs=1e-15)
    assert f(max_iter) == 0.0
    assert f(0) == pytest.approx(factor if warmup_iters else 1.0)


def test_scheduler_steps_per_iteration():
    solver = SolverConfig(lr=1e-4, max_iter=100, warmup_iters=10, warmup_factor=0.1, backbone_multiplier=0.1)
    opt = build_optimizer(_Toy(), solver)
    sched = build_lr_scheduler(opt, solver)
    seen = []
    for _ in range(100):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    head = [lrs[-1] for lrs in seen]
    assert head[0] == pytest.approx(1e-4 * 0.1)
    assert head[5] == pytest.approx(1e-4 * (0.1 * 0.5 + 0.5) * (1 - 5 / 100) ** 0.9)
    assert head[50] == pytest.approx(1e-4 * 0.5 ** 0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(opt.param_groups)
    # scheduler state holds primitives only: it survives torch.load(weights_only=True)
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"max_iter": 100, "power": 0.9, "warmup_iters": 10, "warmup_factor": 0.1}


def test_warmup_multistep_schedule():
    # detectron2's WarmupMultiStepLR (official COCO panoptic: x0.1 at 369600 of 554400)
    f = WarmupMultiStep((30, 60), 0.1, warmup_iters=10, warmup_factor=0.001)
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [f(it) for it in (10, 29)] == [1.0, 1.0]
    assert [f(it) for it in (30, 59, 60, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    solver = SolverConfig(lr=1e-4, max_iter=8, lr_scheduler="step", steps=(3, 6), gamma=0.5)
    opt = build_optimizer(_Toy(), solver)
    sched = build_lr_scheduler(opt, solver)
    head = []
    for _ in range(8):
        head.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert head == pytest.approx([1e-4] * 3 + [5e-5] * 3 + [2.5e-5] * 2)
    assert sched.state_dict()["lr_lambdas"][0] == {"steps": [3, 6], "gamma": 0.5, "warmup_iters": 0,
                                                   "warmup_factor": 1.0}
    with pytest.raises(ValueError, match="must be 'poly' or 'step'"):
        build_lr_scheduler(opt, SolverConfig(lr_scheduler="cosine"))
    with pytest.raises(ValueError, match="increasing positive"):
        build_lr_scheduler(opt, SolverConfig(lr_scheduler="step", steps=(6, 3)))


def test_full_model_clipping():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(4))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm([a, b], 0.01)
    assert float(norm) == pytest.approx(5.0)
    total = math.sqrt(float(a.grad.square().sum() + b.grad.square().sum()))
    assert total == pytest.approx(0.01, rel=1e-4)  # one norm over all parameters
    assert float(a.grad[0] / b.grad[1]) == pytest.approx(0.75)
    b.grad = torch.tensor([float("nan"), 0, 0, 0])
    assert not math.isfinite(float(clip_grad_norm([a, b], 0.01)))
