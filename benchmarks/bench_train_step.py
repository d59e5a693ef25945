"""End-to-end MaskFormer / Mask2Former / EoMT training step: eager vs torch.compile vs fused, side by side.

``--arch mask2former`` runs the ``mask2former-<preset>`` config (10 predictions, point-sampled
criterion) with the providers eager (point sampling, scipy loop), compile, batched (point
sampling, batched solver), fused (the fused point-sampled matching cost and loss),
eager-full and fused-full (``loss.mask_sampling: full``: the exact full-resolution BCE + dice,
by the plain-PyTorch reference or through the fused mask-loss kernels, CUDA only), beside
``transformers``: Hugging Face's
``Mask2FormerForUniversalSegmentation`` and its own loss (point sampling, scipy matcher) with the
same weights (ResNet presets; every provider then starts from the converted HF model), and
``official``: facebookresearch/Mask2Former's own model and criterion (detectron2) from a checkout
given by ``--official PATH`` (never vendored; the row is skipped without the option), loaded with
the same weights through ``convert.detectron2_name_table``. It needs detectron2 and the checkout's
compiled ``MultiScaleDeformableAttention`` extension (its ``setup.py``; a CUDA toolkit, no GPU, with
``FORCE_CUDA=1``; the README gives the build and the patch torch 2.14 needs) to import; on CPU
tensors the official module falls back to its pure-PyTorch deformable attention. The official R50
runs FrozenBN, as ours; transformers' ResNet trains its BatchNorm. The official row also reports
the largest difference of its class and mask logits from ours on the batch (every prediction;
float32 round-off when the weights load right) and ``official_check`` puts its step-0 loss next
to the other providers' (equal up to the point-sampling noise: each code draws its own points).

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
    ... --providers batched transformers official --official ~/src/Mask2Former
"""
from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_matching_cost import time_providers  # noqa: E402
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
    "official": (None, None, False),  # Mask2Former only: the official code (--official PATH), same weights
}
MASK2FORMER_ONLY = ("eager-full", "fused-full", "transformers", "official")  # and EoMT, but "official"
EOMT_DEFAULT_PRESET = "eomt-coco-panoptic-dinov2-s-640"
# the official ADE20K semantic configs, by backbone (the model's shape is then overridden from ours)
_OFFICIAL_CONFIGS = {"resnet50": "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
                     "resnet101": "configs/ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml"}
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


def target_masks(targets) -> list:
    """Each target's binary masks bool [M, H, W] (segment order), the layout of the other codes."""
    return [t.segment_map[None] == torch.arange(t.num_segments, device=t.segment_map.device)[:, None, None]
            for t in targets]


def make_hf_step(model, optimizer, images, targets, amp: bool, device):
    """A transformers training step: its forward computes its own (point-sampled) loss."""
    masks = [m.float() for m in target_masks(targets)]
    classes = [t.labels for t in targets]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(pixel_values=images, mask_labels=masks, class_labels=classes).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def official_problem(path) -> str | None:
    """Why the official code at ``path`` cannot run here (one line), or None."""
    root = Path(path).expanduser()
    if not (root / "mask2former" / "maskformer_model.py").is_file():
        return f"--official {path}: not a facebookresearch/Mask2Former checkout (no mask2former/maskformer_model.py)"
    if importlib.util.find_spec("detectron2") is None:
        return ("--official needs detectron2, which is not installed (not on PyPI: pip install --no-build-isolation "
                "'git+https://github.com/facebookresearch/detectron2.git'; its setup imports torch)")
    if importlib.util.find_spec("MultiScaleDeformableAttention") is None:
        return ("--official needs the checkout's compiled MultiScaleDeformableAttention extension (cd "
                f"{root / 'mask2former/modeling/pixel_decoder/ops'} && FORCE_CUDA=1 CUDA_HOME=<toolkit> python "
                "setup.py build install: a CUDA toolkit, no GPU; torch 2.14 needs a two-line patch, see the README)")
    return None


def official_mask2former(path, cfg, our_model, device):
    """facebookresearch/Mask2Former's ``MaskFormer`` (model + its criterion) from the checkout at
    ``path``, shaped like ``cfg`` and holding ``our_model``'s weights, in training mode. Inputs are
    taken as already normalised (pixel mean 0, std 1), as the other providers'."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    from fastmaskformer.convert.detectron2 import detectron2_name_table

    root = str(Path(path).expanduser().resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    from mask2former import add_maskformer2_config

    m, loss = cfg.model, cfg.loss
    if m.backbone.name not in _OFFICIAL_CONFIGS:
        raise ValueError(f"the official provider knows the ResNet presets {sorted(_OFFICIAL_CONFIGS)}, "
                         f"got backbone {m.backbone.name!r}")
    d2 = get_cfg()
    add_deeplab_config(d2)
    add_maskformer2_config(d2)
    d2.merge_from_file(str(Path(root) / _OFFICIAL_CONFIGS[m.backbone.name]))
    enc_layers = {"enc_layers": 6, **m.pixel_decoder_kwargs}["enc_layers"]
    d2.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device),
        "MODEL.PIXEL_MEAN", [0.0, 0.0, 0.0], "MODEL.PIXEL_STD", [1.0, 1.0, 1.0],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", int(m.num_classes), "MODEL.SEM_SEG_HEAD.CONVS_DIM", int(m.conv_dim),
        "MODEL.SEM_SEG_HEAD.MASK_DIM", int(m.mask_dim), "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", int(enc_layers),
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", int(m.num_queries), "MODEL.MASK_FORMER.DEC_LAYERS", int(m.dec_layers),
        "MODEL.MASK_FORMER.HIDDEN_DIM", int(m.hidden_dim), "MODEL.MASK_FORMER.NHEADS", int(m.nheads),
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", int(m.dim_feedforward), "MODEL.MASK_FORMER.DROPOUT", float(m.dropout),
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", int(loss.num_points),
        "MODEL.MASK_FORMER.OVERSAMPLE_RATIO", float(loss.oversample_ratio),
        "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO", float(loss.importance_sample_ratio),
        "MODEL.MASK_FORMER.CLASS_WEIGHT", float(loss.class_weight), "MODEL.MASK_FORMER.MASK_WEIGHT",
        float(loss.mask_weight), "MODEL.MASK_FORMER.DICE_WEIGHT", float(loss.dice_weight),
        "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT", float(loss.no_object_weight)])
    model = build_model(d2)
    ours = our_model.state_dict()
    state = collections.OrderedDict(
        (official, ours[key]) for official, key in detectron2_name_table(our_model).items())
    # the model's own module versions: without them the official MaskFormerHead (version 2) takes
    # the dict for a pre-v2 checkpoint and moves every sem_seg_head.pixel_decoder.* key to
    # sem_seg_head.pixel_decoder.pixel_decoder.*
    state._metadata = model.state_dict()._metadata
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("num_batches_tracked", "criterion.empty_weight"))]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the official model does not take our weights: missing {missing[:8]}, "
                           f"unexpected {result.unexpected_keys[:8]}")
    return model.to(device).train()


def official_output_diff(official, ours, images) -> dict:
    """Max |official - ours| over every prediction's class logits and mask logits on ``images``
    (fp32, no grad; ``official`` normalises with mean 0, std 1): the same network with the same
    weights agrees to float32 round-off (~1e-6 on the ADE20K R50 shape). The step losses cannot
    be compared this tightly: each code draws its own random points (see ``official_losses``)."""
    ours = copy.deepcopy(ours).to(images.device)
    with torch.no_grad():
        theirs = official.sem_seg_head(official.backbone((images - official.pixel_mean) / official.pixel_std))
        mine = ours(images)
    layers = [*theirs["aux_outputs"], theirs]
    if len(layers) != mine.class_logits.shape[0]:
        raise RuntimeError(f"the official model makes {len(layers)} predictions, ours {mine.class_logits.shape[0]}")
    return {"class_logits": max(float((t["pred_logits"] - mine.class_logits[i]).abs().max())
                                for i, t in enumerate(layers)),
            "mask_logits": max(float((t["pred_masks"] - mine.pred_masks(i)).abs().max())
                               for i, t in enumerate(layers))}


def official_losses(rows) -> dict:
    """Step-0 losses of the official row next to the other providers' (same weights, same batch).
    Each provider draws its own random points (ours from the criterion's generator, the official
    code and transformers from the global one after ``torch.manual_seed(1)``), so the losses agree
    only to the point-sampling noise; transformers' ResNet also trains its BatchNorm."""
    found = {}
    for r in rows:
        if r["provider"] == "official" and "loss_step0" in r:
            others = {o["provider"]: o["loss_step0"] for o in rows
                      if o["precision"] == r["precision"] and o["provider"] != "official" and "loss_step0" in o}
            found[r["precision"]] = {"official": r["loss_step0"], **others,
                                     "outputs_max_abs_diff_vs_ours": r.get("outputs_max_abs_diff_vs_ours")}
    return found


def make_official_step(model, optimizer, images, targets, amp: bool, device):
    """An official training step: the model's forward returns its weighted loss terms."""
    from detectron2.structures import Instances

    inputs = [{"image": image, "instances": Instances(tuple(image.shape[-2:]), gt_classes=t.labels, gt_masks=masks)}
              for image, t, masks in zip(images, targets, target_masks(targets))]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total = sum(model(inputs).values())
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def build(cfg, provider: str, device, base_model, official_path=None):
    impl, solver, compiled = PROVIDERS[provider]
    if provider == "official":  # the official code's model and criterion with base_model's weights
        model = official_mask2former(official_path, cfg, base_model, device)
        return model, None, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
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


def available(provider: str, device, hf_model, official_path=None) -> str | None:
    if provider.startswith("fused") and device.type != "cuda":
        return "needs CUDA (the Triton interpreter is not a performance path)"
    if provider == "transformers" and hf_model is None:
        return "needs transformers and a ResNet-50/101 Mask2Former or DINOv2 EoMT preset"
    if provider == "official" and official_path is None:
        return "needs --official PATH (a facebookresearch/Mask2Former checkout)"
    if provider == "official" and hf_model is None:  # base_model is then not the ResNet twin
        return "needs a ResNet-50/101 Mask2Former preset (and transformers, for the shared weights)"
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
    cfg.model.num_queries = args.queries or cfg.model.num_queries
    cfg.model.num_classes = args.classes or cfg.model.num_classes
    cfg.model.backbone.img_size = args.size
    return cfg


def run(args) -> list[dict]:
    device = torch.device(args.device)
    cfg = config_for(args)
    base_model, hf_model = base_models(cfg)
    images, targets = random_batch(args.batch, args.size, cfg.model.num_classes, args.segments, device)
    rows, first_losses, pending = [], {}, []
    for amp in ([False, True] if args.amp == "both" else [args.amp == "bf16"]):
        for provider in args.providers:
            if provider in MASK2FORMER_ONLY and cfg.model.meta_arch not in ("mask2former", "eomt"):
                continue
            if provider == "official" and cfg.model.meta_arch != "mask2former":
                continue
            row = {"provider": provider, "precision": "bf16" if amp else "fp32", "batch": args.batch,
                   "size": args.size, "K": cfg.model.num_classes, "backbone": cfg.model.backbone.name}
            official = getattr(args, "official", None)
            reason = available(provider, device, hf_model, official)
            if reason:
                rows.append({**row, "skipped": reason})
                continue
            if provider == "transformers":
                model, criterion, optimizer = build(cfg, provider, device, hf_model)
                step = make_hf_step(model, optimizer, images, targets, amp, device)
            elif provider == "official":
                model, criterion, optimizer = build(cfg, provider, device, base_model, official)
                row["outputs_max_abs_diff_vs_ours"] = official_output_diff(model, base_model, images)
                step = make_official_step(model, optimizer, images, targets, amp, device)
            else:
                model, criterion, optimizer = build(cfg, provider, device, base_model)
                step = make_step(model, criterion, optimizer, images, targets, amp, device)
            try:
                # step 0 loss on fresh weights; the same seed gives every provider the same
                # dropout masks, so the losses are comparable
                torch.manual_seed(1)
                first_losses[(provider, amp)] = float(step())
                if args.interleave:  # timed below, all providers in turn
                    pending.append((row, step))
                else:
                    row.update(measure(step, device, warmup=args.warmup, repeats=args.repeats))
            except torch.cuda.OutOfMemoryError:
                rows.append({**row, "skipped": "out of memory"})
                continue
            row["loss_step0"] = first_losses[(provider, amp)]
            rows.append(row)
            del model, criterion, optimizer, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if pending:  # rounds of one step per provider: load and drift hit every provider alike
            timings = time_providers({row["provider"]: step for row, step in pending}, device, rounds=args.repeats,
                                     warmup=args.warmup)
            for row, _ in pending:
                row.update(timings[row["provider"]], interleaved=True)
            pending.clear()
    for r in rows:
        if "median_ms" in r:
            r["images_per_s"] = args.batch / (r["median_ms"] / 1e3)
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
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the providers in rounds, one step each per round, all models alive (default on "
                        "the CPU without --cpu-memory: on a busy 2-core box a provider timed after the others "
                        "on its own can move by 20%%); --no-interleave: one provider after the other")
    p.add_argument("--cpu-memory", action="store_true",
                   help="CPU: also report peak memory (runs with a fixed glibc mmap threshold, which makes "
                        "every large allocation a system call: time such a run separately)")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="a facebookresearch/Mask2Former checkout for the official provider (needs detectron2)")
    p.add_argument("--json", default=None, help="output JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.official is not None and (problem := official_problem(args.official)):
        p.error(problem)
    if args.interleave is None:
        args.interleave = args.device == "cpu" and not args.cpu_memory
    if args.interleave and args.cpu_memory:
        p.error("--cpu-memory measures one provider at a time: use it with --no-interleave")
    if args.device == "cpu" and args.cpu_memory:
        track_cpu_memory()
        torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args)
    extra = {"args": vars(args)}
    if official_check := official_losses(rows):
        extra["official_check"] = official_check
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
    for key in ("official_check", "loss_agreement", "headroom"):
        if key in extra:
            print(key, extra[key])
    print("wrote", path)


if __name__ == "__main__":
    main()
