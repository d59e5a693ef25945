"""End-to-end MaskFormer / Mask2Former / EoMT training step: eager vs torch.compile vs fused, side by side.

``--arch mask2former`` runs the ``mask2former-<preset>`` config (10 predictions, point-sampled
criterion) with the providers eager (point sampling, scipy loop), compile, batched (point
sampling, batched solver), fused (the fused point-sampled matching cost and loss),
eager-full and fused-full (``loss.mask_sampling: full``: the exact full-resolution BCE + dice,
by the plain-PyTorch reference or through the fused mask-loss kernels, CUDA only), beside
``transformers``: Hugging Face's
``Mask2FormerForUniversalSegmentation`` and its own loss (point sampling, scipy matcher) with the
same weights (ResNet presets; every provider then starts from the converted HF model).

``--arch eomt`` runs an ``eomt-*`` preset (default ``eomt-coco-panoptic-dinov2-s-640`` at
``--size``; its ViT, queries in the last blocks, point-sampled criterion on every prediction,
masked attention on as at the start of training) with eager (the official-style step: the
reference criterion and the per-image scipy matcher on the CPU), batched, fused, compile and
``transformers``: ``EomtForUniversalSegmentation`` with its own loss (the Mask2Former loss
ported layer by layer, scipy matcher); ours is converted from it (``convert/hf_eomt.py``), so
every provider computes the same network from the same weights.

Providers (same weights, same batch, one process):
- eager:   reference torch ops + the official per-image scipy matcher loop;
- compile: the same with ``torch.compile`` on the model and the criterion;
- batched: reference torch ops + the one-sync batched C++ solver (isolates the solver's share);
- fused:   Triton kernels (matching cost, mask loss) + the batched solver (CUDA only);
- fused+compile: the fused path with ``torch.compile`` on the model and the criterion's loss
  region (``solver.compile`` in training: the Triton operators and the solver's one host sync
  inside one graph; CUDA only).
Each in fp32 and bf16 autocast. A step = forward + criterion (all layers) + backward + AdamW step.
Peak memory: on CUDA the allocator's peak, on the CPU (``--cpu-memory``) the peak resident set
above the set held between steps (``common.track_cpu_memory``; that mode slows allocation, so
CPU times come from a run without it).
Also checks that eager and fused losses agree at step 0 and stay close after ``--steps`` steps,
and (``--headroom``) finds the largest batch that fits for eager vs fused.

GPU (one ~8-minute device call):
    python benchmarks/bench_train_step.py --device cuda --preset ade20k-150-r50 --size 512 --batch 16
CPU (small, committed under benchmarks/results/):
    python benchmarks/bench_train_step.py --device cpu --arch eomt --size 128 --batch 2 --amp fp32 \
        --providers eager batched transformers --steps 3 [--cpu-memory]
    python benchmarks/bench_train_step.py --device cpu --size 128 --batch 2 --queries 100
    python benchmarks/bench_train_step.py --device cpu --arch mask2former --size 256 --batch 2 --amp fp32 \
        --providers eager batched eager-full transformers --steps 0 [--cpu-memory]
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import measure, result_path, track_cpu_memory, write_results  # noqa: E402

import fastmaskformer as fmf  # noqa: E402
from fastmaskformer.losses import (  # noqa: E402
    HungarianMatcher,
    PointMatcher,
    PointSampledCriterion,
    SetCriterion,
)

PROVIDERS = {
    # name: (loss impl, solver, compiled)
    "eager": ("torch", "scipy", False),
    "compile": ("torch", "scipy", True),
    "batched": ("torch", "batched", False),
    "fused": ("triton", "batched", False),
    "fused+compile": ("triton", "batched", True),
    "eager-full": ("torch", "batched", False),  # Mask2Former only: full-resolution BCE + dice
    "fused-full": ("triton", "batched", False),
    "transformers": (None, None, False),  # Mask2Former and EoMT: HF's model and loss, same weights
}
MASK2FORMER_ONLY = ("eager-full", "fused-full", "transformers")  # and EoMT (point-sampled criterion)
EOMT_DEFAULT_PRESET = "eomt-coco-panoptic-dinov2-s-640"
_HF_RESNET_DEPTHS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}


def random_batch(batch: int, size: int, num_classes: int, segments: int, device, seed: int = 0):
    """Images [B,3,S,S] (normalised) and B semantic targets with ``segments`` classes each,
    laid out as random blocks so masks have realistic extents."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = []
    cells = 8
    for _ in range(batch):
        classes = torch.randperm(num_classes, generator=g)[:segments]
        grid = classes[torch.randint(0, segments, (cells, cells), generator=g)]
        label_map = grid.repeat_interleave(size // cells, 0).repeat_interleave(size // cells, 1)
        targets.append(fmf.Target.from_semantic(label_map, ignore_label=-1).to(device))
    return images.to(device), targets


def make_step(model, criterion, optimizer, images, targets, amp: bool, device):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
        losses = criterion(outputs, targets)
        total = criterion.total(losses)
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def hf_mask2former(cfg):
    """transformers' ``Mask2FormerForUniversalSegmentation`` shaped like ``cfg`` (model and loss
    weights, point counts), random weights, or None when transformers is not installed."""
    try:
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    except ImportError:
        return None
    m, loss = cfg.model, cfg.loss
    decoder = {"enc_layers": 6, "dim_feedforward": 1024, **m.pixel_decoder_kwargs}
    backbone = ResNetConfig(depths=_HF_RESNET_DEPTHS[m.backbone.name], hidden_sizes=[256, 512, 1024, 2048],
                            embedding_size=64, layer_type="bottleneck",
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, feature_size=m.conv_dim,
        mask_feature_size=m.mask_dim, hidden_dim=m.hidden_dim, encoder_layers=decoder["enc_layers"],
        encoder_feedforward_dim=decoder["dim_feedforward"], decoder_layers=m.dec_layers,
        num_attention_heads=m.nheads, dim_feedforward=m.dim_feedforward, dropout=m.dropout,
        num_queries=m.num_queries, num_labels=m.num_classes, output_auxiliary_logits=True,
        train_num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio, class_weight=loss.class_weight,
        mask_weight=loss.mask_weight, dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config)


def hf_eomt(cfg):
    """transformers' ``EomtForUniversalSegmentation`` shaped like ``cfg`` (a DINOv2 ViT preset: width,
    depth, heads, query blocks, loss weights and point counts), random weights, or None when
    transformers is not installed."""
    try:
        from transformers import EomtConfig, EomtForUniversalSegmentation
    except ImportError:
        return None
    m, loss = cfg.model, cfg.loss
    arch = {**_DINOV2_SHAPES[m.backbone.name], **{k: v for k, v in (m.backbone.kwargs or {}).items()
                                                   if k in ("embed_dim", "depth", "num_heads")}}
    config = EomtConfig(
        hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"], num_attention_heads=arch["num_heads"],
        use_swiglu_ffn=m.backbone.name == "dinov2_giant", image_size=m.backbone.img_size, patch_size=m.patch_size,
        num_blocks=m.num_blocks, num_queries=m.num_queries, num_labels=m.num_classes,
        train_num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio, class_weight=loss.class_weight,
        mask_weight=loss.mask_weight, dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight)
    torch.manual_seed(0)
    return EomtForUniversalSegmentation(config)


_DINOV2_SHAPES = {  # our alias -> the timm ViT's width, depth, heads
    "dinov2_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "dinov2_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "dinov2_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "dinov2_giant": {"embed_dim": 1536, "depth": 40, "num_heads": 24},
}


def base_models(cfg):
    """(our model, the HF twin or None): for Mask2Former with a ResNet backbone or EoMT with a
    DINOv2 ViT, and transformers installed, ours is the converted HF model (the same weights);
    otherwise a seeded build."""
    hf = None
    if cfg.model.meta_arch == "mask2former" and cfg.model.backbone.name in _HF_RESNET_DEPTHS:
        hf = hf_mask2former(cfg)
    elif cfg.model.meta_arch == "eomt" and cfg.model.backbone.name in _DINOV2_SHAPES:
        hf = hf_eomt(cfg)
    if hf is None:
        torch.manual_seed(0)
        return fmf.build_model(cfg.model), None
    from fastmaskformer.convert import from_hf

    return from_hf(hf), hf


def make_hf_step(model, optimizer, images, targets, amp: bool, device):
    """A transformers training step: its forward computes its own (point-sampled) loss."""
    masks = [(t.segment_map[None] == torch.arange(t.num_segments, device=device)[:, None, None]).float()
             for t in targets]
    classes = [t.labels for t in targets]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(pixel_values=images, mask_labels=masks, class_labels=classes).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def build(cfg, provider: str, device, base_model):
    impl, solver, compiled = PROVIDERS[provider]
    model = copy.deepcopy(base_model).to(device).train()
    if provider == "transformers":  # base_model is the HF model, whose forward computes its loss
        return model, None, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    if cfg.model.meta_arch in ("mask2former", "eomt"):
        loss = cfg.loss
        matcher = PointMatcher(loss.class_weight, loss.mask_weight, loss.dice_weight, solver=solver, impl=impl)
        criterion = PointSampledCriterion(cfg.model.num_classes, matcher, impl=impl, num_points=loss.num_points,
                                          mask_sampling="full" if provider.endswith("-full") else "points").to(device)
    else:
        criterion = SetCriterion(cfg.model.num_classes, HungarianMatcher(solver=solver, impl=impl),
                                 impl=impl).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    if compiled:  # as training with solver.compile: the model and the criterion's loss region
        model = torch.compile(model)
        criterion.losses = torch.compile(criterion.losses)
    return model, criterion, optimizer


def available(provider: str, device, hf_model) -> str | None:
    if provider.startswith("fused") and device.type != "cuda":
        return "needs CUDA (the Triton interpreter is not a performance path)"
    if provider == "transformers" and hf_model is None:
        return "needs transformers and a ResNet-50/101 Mask2Former or DINOv2 EoMT preset"
    return None


def config_for(args):
    """The preset (``mask2former-`` prefixed for ``--arch mask2former``; for ``--arch eomt`` an
    ``eomt-*`` preset, ``EOMT_DEFAULT_PRESET`` unless one is named) with the CLI's sizes."""
    name, arch = args.preset, getattr(args, "arch", "maskformer")
    if arch == "mask2former" and not name.startswith("mask2former-"):
        name = "mask2former-" + name
    if arch == "eomt" and not name.startswith("eomt-"):
        name = EOMT_DEFAULT_PRESET
    cfg = fmf.get_config(name)
    cfg.model.num_queries = args.queries
    cfg.model.num_classes = args.classes or cfg.model.num_classes
    cfg.model.backbone.img_size = args.size
    return cfg


def run(args) -> list[dict]:
    device = torch.device(args.device)
    cfg = config_for(args)
    base_model, hf_model = base_models(cfg)
    images, targets = random_batch(args.batch, args.size, cfg.model.num_classes, args.segments, device)
    rows, first_losses = [], {}
    for amp in ([False, True] if args.amp == "both" else [args.amp == "bf16"]):
        for provider in args.providers:
            if provider in MASK2FORMER_ONLY and cfg.model.meta_arch not in ("mask2former", "eomt"):
                continue
            row = {"provider": provider, "precision": "bf16" if amp else "fp32", "batch": args.batch,
                   "size": args.size, "K": cfg.model.num_classes, "backbone": cfg.model.backbone.name}
            reason = available(provider, device, hf_model)
            if reason:
                rows.append({**row, "skipped": reason})
                continue
            if provider == "transformers":
                model, criterion, optimizer = build(cfg, provider, device, hf_model)
                step = make_hf_step(model, optimizer, images, targets, amp, device)
            else:
                model, criterion, optimizer = build(cfg, provider, device, base_model)
                step = make_step(model, criterion, optimizer, images, targets, amp, device)
            try:
                # step 0 loss on fresh weights; the same seed gives every provider the same
                # dropout masks, so the losses are comparable
                torch.manual_seed(1)
                first_losses[(provider, amp)] = float(step())
                timing = measure(step, device, warmup=args.warmup, repeats=args.repeats)
            except torch.cuda.OutOfMemoryError:
                rows.append({**row, "skipped": "out of memory"})
                continue
            row.update(timing, images_per_s=args.batch / (timing["median_ms"] / 1e3), loss_step0=first_losses[(provider, amp)])
            rows.append(row)
            del model, criterion, optimizer, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    baseline = {r["precision"]: r for r in rows if r["provider"] == "eager" and "median_ms" in r}
    for r in rows:
        base = baseline.get(r["precision"])
        if base and "median_ms" in r:
            r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
            if "peak_mem_mib" in r and base.get("peak_mem_mib"):
                r["mem_ratio_vs_eager"] = base["peak_mem_mib"] / r["peak_mem_mib"]
    return rows


def loss_agreement(args) -> dict:
    """Eager vs ``other`` provider: losses at step 0 and after ``--steps`` identical-data steps."""
    device = torch.device(args.device)
    other = "fused" if device.type == "cuda" else "batched"
    cfg = config_for(args)
    base_model, _ = base_models(cfg)
    curves = {}
    for provider in ("eager", other):
        model, criterion, optimizer = build(cfg, provider, device, base_model)
        losses = []
        for s in range(args.steps + 1):
            images, targets = random_batch(args.batch, args.size, cfg.model.num_classes, args.segments, device, seed=s)
            torch.manual_seed(s)  # identical dropout masks for both providers
            losses.append(float(make_step(model, criterion, optimizer, images, targets, False, device)()))
        curves[provider] = losses
    return {"compared": ["eager", other], "steps": args.steps, "loss_step0": [curves["eager"][0], curves[other][0]],
            "loss_final": [curves["eager"][-1], curves[other][-1]],
            "max_rel_diff": max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(curves["eager"], curves[other]))}


def headroom(args) -> dict:
    """Largest batch (up to 64) that fits for eager vs fused at the configured K (CUDA only)."""
    device = torch.device(args.device)
    cfg = fmf.get_config(args.preset)
    cfg.model.num_classes = args.classes or cfg.model.num_classes
    base_model = fmf.build_model(cfg.model)
    found = {}
    for provider in ("eager", "fused"):
        best = 0
        for batch in (2, 4, 8, 16, 24, 32, 48, 64):
            try:
                model, criterion, optimizer = build(cfg, provider, device, base_model)
                images, targets = random_batch(batch, args.size, cfg.model.num_classes, args.segments, device)
                make_step(model, criterion, optimizer, images, targets, False, device)()
                torch.cuda.synchronize()
                best = batch
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                model = criterion = optimizer = None
                torch.cuda.empty_cache()
        found[provider] = best
    return {"largest_batch": found, "K": cfg.model.num_classes, "size": args.size}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="ade20k-150-r50", help="model preset (backbone, K)")
    p.add_argument("--arch", choices=["maskformer", "mask2former", "eomt"], default="maskformer",
                   help="mask2former: the mask2former-<preset> config and point-sampled criterion; "
                        f"eomt: an eomt-* preset (default {EOMT_DEFAULT_PRESET})")
    p.add_argument("--classes", type=int, default=None, help="override K (e.g. 847)")
    p.add_argument("--size", type=int, default=512, help="square crop size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--segments", type=int, default=16, help="GT segments per image")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--amp", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="steps for the loss-agreement check (0: skip)")
    p.add_argument("--headroom", action="store_true", help="also search the largest batch that fits (CUDA)")
    p.add_argument("--cpu-memory", action="store_true",
                   help="CPU: also report peak memory (runs with a fixed glibc mmap threshold, which makes "
                        "every large allocation a system call: time such a run separately)")
    p.add_argument("--json", default=None, help="output JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.cpu_memory:
        track_cpu_memory()
        torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args)
    extra = {"args": vars(args)}
    if args.steps:
        extra["loss_agreement"] = loss_agreement(args)
    if args.headroom and args.device.startswith("cuda"):
        extra["headroom"] = headroom(args)
    columns = ["provider", "precision", "backbone", "K", "batch", "size", "median_ms", "images_per_s",
               "peak_mem_mib", "speedup_vs_eager", "mem_ratio_vs_eager", "loss_step0", "skipped"]
    name = ("train-step" + (f"-{args.arch}" if args.arch != "maskformer" else "")
            + ("-memory" if args.cpu_memory else ""))
    path = args.json or result_path(name, args.device)
    print(write_results(path, rows, args.device, columns, extra))
    for key in ("loss_agreement", "headroom"):
        if key in extra:
            print(key, extra[key])
    print("wrote", path)


if __name__ == "__main__":
    main()
