"""Optimiser parameter groups, the warmup + poly and warmup + multi-step schedules and
full-model clipping (DESIGN 5)."""
import io
import math

import pytest
import torch
from torch import nn

from fastmaskformer.config import SolverConfig
from fastmaskformer.engine.optim import (
    TwoStageWarmupPoly,
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
    with pytest.raises(ValueError, match="must be 'poly', 'step' or 'two_stage_poly'"):
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


# ---------------------------------------------------------------------------- EoMT recipe
EOMT_TINY_VIT = dict(depth=4, embed_dim=32, num_heads=2, mlp_ratio=2.0)


def _tiny_eomt(vit="dinov2_small"):
    from fastmaskformer.config import BackboneConfig, ModelConfig
    from fastmaskformer.modeling import build_model

    return build_model(ModelConfig(meta_arch="eomt", backbone=BackboneConfig(name=vit, img_size=32,
                                                                             kwargs=dict(EOMT_TINY_VIT)),
                                   num_classes=3, num_queries=4, num_blocks=2))


def _official_lrs(model, lr, llrd, llrd_l2_enabled):
    """The official rule (tue-mps/eomt ``configure_optimizers``), restated independently of ours:
    walk every parameter backwards remembering the last ViT block index seen (starting past the
    last block); a ViT parameter in a block, or met after block 0, gets ``lr * llrd **
    (depth - 1 - block)``; the ViT's final norm and the query blocks (without ``llrd_l2``) get
    ``lr``; parameters outside the ViT get ``lr``."""
    depth, query_blocks = 4, (2, 3)
    block, lrs = depth, {}
    for name, _ in reversed(list(model.named_parameters())):
        if not name.startswith("backbone.vit."):
            lrs[name] = lr
            continue
        parts = name.split(".")
        in_block = "blocks" in parts
        if in_block:
            block = int(parts[parts.index("blocks") + 1])
        value = lr * llrd ** (depth - 1 - block) if (in_block or block == 0) else lr
        if name.startswith("backbone.vit.norm."):
            value = lr
        if in_block and block in query_blocks and not llrd_l2_enabled:
            value = lr
        lrs[name] = value
    return lrs


def _lrs_by_name(model, solver):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in build_param_groups(model, solver) for p in g["params"]}


@pytest.mark.parametrize("vit", ["dinov2_small", "dinov3_small"])
@pytest.mark.parametrize("query_blocks_decay", [True, False])
def test_layer_decay_is_the_official_rule(vit, query_blocks_decay):
    model = _tiny_eomt(vit)
    solver = SolverConfig(lr=1e-4, backbone_multiplier=1.0, layer_decay=0.8,
                          layer_decay_query_blocks=query_blocks_decay)
    ours = _lrs_by_name(model, solver)
    assert ours == pytest.approx(_official_lrs(model, 1e-4, 0.8, query_blocks_decay), rel=1e-12)
    # a few entries written out: depth 4, queries in blocks 2 and 3
    query_block = 1e-4 * (0.8 if query_blocks_decay else 1.0)
    expected = {"backbone.vit.cls_token": 1e-4 * 0.8 ** 3, "backbone.vit.reg_token": 1e-4 * 0.8 ** 3,
                "backbone.vit.patch_embed.proj.weight": 1e-4 * 0.8 ** 3,
                "backbone.vit.blocks.0.norm1.weight": 1e-4 * 0.8 ** 3,
                "backbone.vit.blocks.1.mlp.fc2.bias": 1e-4 * 0.8 ** 2,
                "backbone.vit.blocks.2.attn.qkv.weight": query_block, "backbone.vit.blocks.3.norm2.bias": 1e-4,
                "backbone.vit.norm.weight": 1e-4, "queries.weight": 1e-4, "class_head.weight": 1e-4,
                "mask_head.4.bias": 1e-4, "upscale.1.norm.weight": 1e-4}
    if vit == "dinov2_small":
        expected["backbone.vit.pos_embed"] = 1e-4 * 0.8 ** 3
    assert {k: ours[k] for k in expected} == pytest.approx(expected, rel=1e-12)


def test_layer_decay_groups_weight_decay_and_bad_use():
    from fastmaskformer import get_config

    model = _tiny_eomt()
    solver = get_config("eomt-coco-panoptic-dinov2-l-640").solver
    groups = build_param_groups(model, solver)
    assert {g["weight_decay"] for g in groups} == {0.05}  # official: one weight decay for every parameter
    assert sorted(g["name"] for g in groups if g["name"].startswith("backbone")) == [
        "backbone/decay/layer0", "backbone/decay/layer1", "backbone/decay/layer2", "backbone/decay/layer3",
        "backbone/norm/layer0", "backbone/norm/layer1", "backbone/norm/layer2", "backbone/norm/layer3"]
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())
    assert _lrs_by_name(model, SolverConfig(layer_decay=1.0, backbone_multiplier=1.0)) == pytest.approx(
        {n: 1e-4 for n, _ in model.named_parameters()})
    with pytest.raises(ValueError, match="solver.layer_decay needs a ViT encoder .*set solver.layer_decay: 1.0"):
        build_param_groups(_Toy(), SolverConfig(layer_decay=0.8))


def test_eomt_presets_recipe():
    from fastmaskformer import get_config

    for name, lr, stages, decay, query_blocks in [
            ("eomt-coco-panoptic-dinov2-l-640", 1e-4, (500, 1000), 0.8, True),
            ("eomt-ade20k-150-dinov2-l-512", 1e-4, (500, 1000), 0.8, True),
            ("eomt-coco-panoptic-dinov3-l-640", 2e-4, (2000, 3000), 0.8, False),
            ("eomt-coco-instance-dinov3-l-1280", 2e-4, (2000, 3000), 0.8, False),
            ("eomt-ade20k-150-dinov3-l-512", 2e-4, (2000, 3000), 1.0, False)]:
        s = get_config(name).solver
        assert (s.lr, s.lr_scheduler, (s.warmup_iters, s.backbone_warmup_iters), s.poly_power) == (
            lr, "two_stage_poly", stages, 0.9), name
        assert (s.layer_decay, s.layer_decay_query_blocks, s.clip_grad_norm) == (decay, query_blocks, 0.01), name
    assert get_config("mask2former-ade20k-150-r50").solver.layer_decay == 1.0


def test_two_stage_schedule_official_values():
    """Official ``TwoStageWarmupPolySchedule.get_lr`` with warmup_steps (500, 1000), 10000 steps,
    power 0.9, computed by hand per group."""
    head, vit = TwoStageWarmupPoly(10000, 0.9, 500), TwoStageWarmupPoly(10000, 0.9, 1000, delay=500)
    assert [head(s) for s in (0, 1, 250, 499)] == pytest.approx([0.0, 1 / 500, 0.5, 499 / 500])
    assert [head(s) for s in (500, 5000, 9999, 10000)] == pytest.approx(
        [1.0, (1 - 4500 / 9500) ** 0.9, (1 / 9500) ** 0.9, 0.0])
    assert [vit(s) for s in (0, 499, 500, 1000, 1499)] == pytest.approx([0.0, 0.0, 0.0, 0.5, 999 / 1000])
    assert [vit(s) for s in (1500, 5000, 10000)] == pytest.approx([1.0, (1 - 3500 / 8500) ** 0.9, 0.0])
    assert head(12000) == 0.0 and TwoStageWarmupPoly(10, 0.9, 0)(0) == 1.0  # past the end; no warm-up

    model = _tiny_eomt()
    solver = SolverConfig(lr=1e-4, max_iter=40, lr_scheduler="two_stage_poly", warmup_iters=4,
                          backbone_warmup_iters=8, layer_decay=0.8, backbone_multiplier=1.0)
    opt = build_optimizer(model, solver)
    sched = build_lr_scheduler(opt, solver)
    names = [g["name"] for g in opt.param_groups]
    seen = []
    for _ in range(40):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    head_i, norm_i, first_i = names.index("head/decay"), names.index("backbone/norm/layer0"), \
        names.index("backbone/decay/layer3")
    assert [seen[s][head_i] for s in (0, 2, 4, 20)] == pytest.approx([0, 0.5e-4, 1e-4, 1e-4 * (1 - 16 / 36) ** 0.9])
    # the ViT's final norm is backbone (delayed), undecayed; patch embedding / block 0: x0.8^3
    assert [seen[s][norm_i] for s in (0, 3, 4, 8, 12, 20)] == pytest.approx(
        [0, 0, 0, 0.5e-4, 1e-4, 1e-4 * (1 - 8 / 28) ** 0.9])
    assert seen[8][first_i] == pytest.approx(0.5e-4 * 0.8 ** 3)

    # exact resume: plain fields through torch.load(weights_only=True)
    opt2 = build_optimizer(model, solver)
    sched2 = build_lr_scheduler(opt2, solver)
    opt3 = build_optimizer(model, solver)
    sched3 = build_lr_scheduler(opt3, solver)
    for _ in range(10):
        opt3.step()
        sched3.step()
    buffer = io.BytesIO()
    torch.save({"sched": sched3.state_dict(), "opt": opt3.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert [g["lr"] for g in opt2.param_groups] == seen[10]
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == seen[11]
    assert state["sched"]["lr_lambdas"][head_i] == {"max_iter": 40, "power": 0.9, "warmup_iters": 4, "delay": 0}
    assert state["sched"]["lr_lambdas"][norm_i] == {"max_iter": 40, "power": 0.9, "warmup_iters": 8, "delay": 4}
    with pytest.raises(ValueError, match="warm-up lengths must be >= 0"):
        TwoStageWarmupPoly(10, 0.9, -1)
