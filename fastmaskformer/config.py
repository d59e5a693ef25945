"""Configuration as data: one dataclass per concern, presets mirroring the official configs.

``get_config("ade20k-150-r50")`` returns a fresh ``Config``; ``Config.override("a.b=1")``
applies ``--set`` style overrides; ``Config.to_dict`` / ``Config.from_dict`` round-trip YAML.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # timm name or alias: resnet50, resnet101, resnet101c, swin_{tiny,small,base,large};
    # EoMT: dinov2_{small,base,large,giant}, dinov3_{small,base,large,huge_plus} (modeling/vit.py)
    pretrained: bool = False  # never downloads unless a user sets it
    freeze_bn: bool = True  # frozen BatchNorm for ResNets (official)
    img_size: int = 512  # Swin and ViT: the window/pos-embed reference size (inputs may differ)
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (converted custom backbones)


@dataclass
class ModelConfig:
    meta_arch: str = "maskformer"  # maskformer | mask2former | eomt | per_pixel_baseline | per_pixel_baseline_plus
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 150
    num_queries: int = 100
    hidden_dim: int = 256  # transformer width
    mask_dim: int = 256  # C of mask_embed / pixel_embed
    conv_dim: int = 256  # FPN width
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    dec_layers: int = 6
    enc_layers: int = 0  # transformer encoder layers in the pixel decoder ("+6 Enc": 6)
    pixel_decoder: str = "fpn"  # fpn (MaskFormer) | msdeformattn (Mask2Former's deformable-attention decoder)
    pixel_decoder_kwargs: dict = field(default_factory=dict)  # msdeformattn: overrides of its official defaults
    pre_norm: bool = False
    pixel_mean: tuple = (123.675, 116.28, 103.53)
    pixel_std: tuple = (58.395, 57.12, 57.375)
    size_divisibility: int = 32  # pad batches to a multiple (0: to the largest image only; official COCO panoptic)
    # EoMT only (meta_arch eomt; modeling/eomt.py): the queries join the last num_blocks ViT blocks
    num_blocks: int = 4  # official: 3 (ViT-S/B), 4 (L), 5 (g)
    patch_size: int = 16  # DINOv2's 14 re-patched to 16, as the official
    masked_attn: bool = True  # masked attention in the query blocks (official masked_attn_enabled)
    mask_annealing_start: tuple = ()  # per query block: iteration where its mask probability starts to fall
    mask_annealing_end: tuple = ()  # ... and where it reaches 0 (empty: the masks stay on)
    mask_annealing_power: float = 0.9
    mask_annealing_seed: int = 0  # seed of the generator that drops masks (its state is checkpointed)


@dataclass
class LossConfig:
    class_weight: float = 1.0
    mask_weight: float = 20.0  # focal
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    deep_supervision: bool = True
    matching: str = "hungarian"  # hungarian | fixed (MaskFormer-fixed: query i <-> class i)
    impl: str = "auto"  # auto | triton | torch: the mask-loss and matching-cost ops
    # Fused-kernel precisions (None: the op's default). Matching cost: tf32 (default; it only
    # feeds the assignment) | tf32x3 | ieee. Mask loss: ieee (default, exact) | tf32 (fast).
    matching_precision: str | None = None
    mask_loss_precision: str | None = None
    # Mask term: focal (MaskFormer) | bce (Mask2Former: sigmoid BCE, matching on num_points
    # uniform points). Where the loss is computed: full (every pixel, the fused mask-loss op;
    # with bce: the exact value of Mask2Former's loss) | points (bce only: Mask2Former's
    # num_points importance-sampled points per matched mask).
    mask_loss: str = "focal"
    mask_sampling: str = "full"
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    point_seed: int = 0  # seed of the criterion's point generator (its state is checkpointed)


@dataclass
class DataConfig:
    dataset: str = "ade20k-150"  # see fastmaskformer.data.DATASETS
    root: str | None = None  # --data-root or $FASTMASKFORMER_DATASETS
    train_split: str = "training"
    val_split: str = "validation"
    ignore_label: int = 255
    crop_size: tuple = (512, 512)
    min_scale_factors: tuple = tuple(x * 0.1 for x in range(5, 21))  # shortest edge = f * crop
    max_size_train: int = 2048
    base_size_train: int | None = None  # shortest edges = int(f * base); None -> max(crop_size)
    min_size_test: int = 512
    max_size_test: int = 2048
    # test resize: shortest-edge (detectron2: shortest edge min_size_test, longest <= max_size_test) |
    # eomt (official EoMT: semantic: shorter side, panoptic/instance: longer side to min_size_test)
    test_resize: str = "shortest-edge"
    single_category_max_area: float = 1.0
    color_jitter: bool = True
    augmentation: str | None = None  # training pipeline: semantic | detr | lsj | eomt; None: detr for COCO panoptic only
    jitter_scale: tuple = (0.1, 2.0)  # lsj / eomt: scale range of the large-scale jitter
    num_workers: int = 4
    task: str = "semantic"  # semantic | panoptic | instance
    on_bad_sample: str = "error"  # error: stop at an unreadable training sample | skip: replace it (logged once)
    max_bad_fraction: float = 0.01  # skip: stop once more than this fraction of training files is unreadable


@dataclass
class SolverConfig:
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_multiplier: float = 0.1
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    max_iter: int = 160000
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    lr_scheduler: str = "poly"  # poly (detectron2 WarmupPolyLR) | step (WarmupMultiStepLR: x gamma at each of steps)
    # | two_stage_poly (EoMT: heads warm up over warmup_iters, then the backbone over backbone_warmup_iters; poly)
    backbone_warmup_iters: int = 0  # two_stage_poly: the backbone's own warm-up, after warmup_iters
    layer_decay: float = 1.0  # ViT layer-wise lr decay (EoMT official 0.8): block i x decay**(depth-1-i); 1.0 = off
    layer_decay_query_blocks: bool = True  # false: EoMT's query blocks keep the full lr (official llrd_l2_enabled)
    poly_power: float = 0.9
    steps: tuple = ()
    gamma: float = 0.1
    clip_grad_norm: float = 0.01  # full-model clipping (official)
    amp: bool = False  # bf16 autocast (our option)
    compile: bool = False  # torch.compile the model forward and the criterion's loss region (our option)
    fsdp: bool = False  # FSDP2 (fully_shard per ViT block) instead of DDP under torchrun; EoMT only
    activation_checkpointing: bool = False  # recompute each ViT block in the backward pass; EoMT only
    grad_accum: int = 1
    checkpoint_period: int = 5000
    eval_period: int = 5000
    keep_checkpoints: int = 3
    seed: int = 0


@dataclass
class TestConfig:
    semantic_on: bool = True
    panoptic_on: bool = False
    instance_on: bool = False
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    instance_topk: int = 100  # instance inference: top (query, class) pairs per image (official 100)
    aug_scales: tuple = ()  # multi-scale TTA shortest edges, e.g. (256, 384, ..., 896)
    aug_flip: bool = False
    aug_max_size: int = 3584


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    name: str = "custom"

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = cls()
        _update(cfg, d, "")
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Config":
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError("a config YAML must be a mapping at the top level")
        base = get_config(data.pop("preset")) if "preset" in data else cls()
        _update(base, data, "")
        return base

    def override(self, assignment: str) -> "Config":
        """Apply one ``key.path=value`` override in place (value parsed as YAML)."""
        if "=" not in assignment:
            raise ValueError(f"override {assignment!r} must look like key.path=value")
        key, raw = assignment.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: Any = self
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(node) or not hasattr(node, p):
                raise ValueError(f"unknown config key {key!r} (no section {p!r})")
            node = getattr(node, p)
        last = parts[-1]
        if not dataclasses.is_dataclass(node) or last not in {f.name for f in dataclasses.fields(node)}:
            raise ValueError(f"unknown config key {key!r}")
        _update(node, {last: value}, ".".join(parts[:-1]))
        return self


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _yaml11_float(text: str, path: str) -> float:
    """A float written the way people write them (``1e-4``, ``5E-4``) that YAML 1.1 leaves a string."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"config key {path!r} expects float, got {text!r}") from None


def _update(node, values: dict, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(node)}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ValueError(f"unknown config key {path!r}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {path!r} is a section; give a mapping")
            _update(current, value, path)
            continue
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(current, bool) and not isinstance(value, bool):
            raise ValueError(f"config key {path!r} expects true/false, got {value!r}")
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(current, float) and isinstance(value, str):
            value = _yaml11_float(value, path)  # YAML 1.1 reads "1e-4" (no dot) as a string
        elif current is not None and value is not None and not isinstance(value, type(current)):
            raise ValueError(
                f"config key {path!r} expects {type(current).__name__}, got {value!r}"
            )
        setattr(node, key, value)


# ---------------------------------------------------------------------------- presets
def _semantic(name, num_classes, backbone="resnet50", crop=512, ignore=255, dataset=None, **solver):
    cfg = Config(name=name)
    cfg.model.num_classes = num_classes
    cfg.model.backbone.name = backbone
    cfg.data.dataset = dataset or name.rsplit("-", 1)[0]
    cfg.data.crop_size = (crop, crop) if isinstance(crop, int) else tuple(crop)
    cfg.data.ignore_label = ignore
    cfg.data.min_size_test = min(cfg.data.crop_size)
    if backbone.startswith("swin"):
        cfg.model.backbone.freeze_bn = False
        cfg.model.backbone.img_size = min(cfg.data.crop_size)
        cfg.solver.lr = 6e-5
        cfg.solver.weight_decay = 0.01
        cfg.solver.backbone_multiplier = 1.0
        cfg.solver.warmup_iters = 1500
        cfg.solver.warmup_factor = 1e-6
    for k, v in solver.items():
        setattr(cfg.solver, k, v)
    return cfg


def _panoptic(name, num_classes, dataset, backbone="resnet50", enc_layers=6, crop=640, threshold=0.8, **solver):
    cfg = _semantic(name, num_classes, backbone=backbone, crop=crop, dataset=dataset, **solver)
    cfg.model.enc_layers = enc_layers
    cfg.data.task = "panoptic"
    cfg.test.semantic_on = False
    cfg.test.panoptic_on = True
    cfg.test.object_mask_threshold = threshold
    return cfg


def _coco_panoptic(name, backbone="resnet50", enc_layers=6, max_size_train=1333):
    """Official configs/coco-panoptic (Base-COCO-PanopticSegmentation.yaml,
    maskformer_panoptic_R50_bs64_554k.yaml, swin/maskformer_panoptic_swin_large_IN21k_384_bs64_554k.yaml):
    batch 64, 554400 iterations, detectron2's default multi-step schedule (x0.1 at 369600),
    warmup 10 iterations at factor 1.0 (R50; Swin: 1500 from 1e-6), DETR-style augmentation
    (longest edge <= 1333; Swin-L 1000) and no padding to 32 (``SIZE_DIVISIBILITY: 0``)."""
    cfg = _panoptic(name, 133, "coco-panoptic", backbone=backbone, enc_layers=enc_layers, batch_size=64,
                    max_iter=554400, lr_scheduler="step", steps=(369600,))
    if not backbone.startswith("swin"):
        cfg.solver.warmup_iters = 10
    cfg.model.size_divisibility = 0
    cfg.data.max_size_train = max_size_train
    return cfg


def _mask2former(cfg: Config, num_queries: int = 100) -> Config:
    """A MaskFormer preset turned into the official Mask2Former config of the same task
    (configs/*/maskformer2_*.yaml of facebookresearch/Mask2Former): MSDeformAttn pixel decoder
    (res3-res5, 6 encoder layers), masked-attention decoder with 10 predictions (9 layers),
    dropout 0, class 2 / BCE 5 / dice 5 on 12544 sampled points (oversample 3, importance 0.75);
    AdamW 1e-4, weight decay 0.05, backbone x0.1, no warmup, full-model clipping 0.01 for every
    backbone (Swin included); test thresholds 0.8."""
    cfg.name = "mask2former-" + cfg.name
    m = cfg.model
    m.meta_arch, m.pixel_decoder, m.num_queries = "mask2former", "msdeformattn", num_queries
    m.dec_layers, m.dropout, m.enc_layers, m.pre_norm = 10, 0.0, 0, False
    loss = cfg.loss
    loss.class_weight, loss.mask_weight, loss.dice_weight, loss.no_object_weight = 2.0, 5.0, 5.0, 0.1
    loss.mask_loss, loss.mask_sampling = "bce", "points"
    loss.num_points, loss.oversample_ratio, loss.importance_sample_ratio = 12544, 3.0, 0.75
    s = cfg.solver
    s.lr, s.weight_decay, s.backbone_multiplier, s.clip_grad_norm = 1e-4, 0.05, 0.1, 0.01
    s.warmup_iters, s.warmup_factor = 0, 1.0
    cfg.test.object_mask_threshold = cfg.test.overlap_threshold = 0.8
    return cfg


def _m2f_coco(name, task, backbone="resnet50", num_queries=100, epochs=50):
    """Official configs/coco/{panoptic,instance}-segmentation: batch 16, 50 epochs (368750
    iterations; Swin-L 100 epochs, 737500) with x0.1 steps at 8/9 and 26/27 of the run, warmup 10
    at factor 1, large-scale jitter (1024 crops, scale 0.1-2.0, flip), padding to 32. Instance
    (maskformer2_R50_bs16_50ep.yaml): the 80 thing classes of ``coco_2017_train`` (crowd objects
    dropped from the targets, images without annotations skipped), instance inference only."""
    iters = 368750 * epochs // 50
    steps = (327778, 355092) if epochs == 50 else (655556, 710184)
    classes, dataset = (80, "coco-instance") if task == "instance" else (133, "coco-panoptic")
    cfg = _panoptic(name, classes, dataset, backbone=backbone, enc_layers=0, crop=1024, batch_size=16,
                    max_iter=iters, lr_scheduler="step", steps=steps)
    cfg = _mask2former(cfg, num_queries)
    cfg.solver.warmup_iters = 10
    cfg.data.augmentation = "lsj"
    if task == "instance":
        cfg.data.task = "instance"
        cfg.test.semantic_on, cfg.test.panoptic_on, cfg.test.instance_on = False, False, True
    return cfg


def _m2f_cityscapes_panoptic(name, backbone="resnet50"):
    """Official configs/cityscapes/panoptic-segmentation (Base-Cityscapes-PanopticSegmentation.yaml,
    maskformer2_R50_bs16_90k.yaml): ``cityscapes_fine_panoptic_train`` (19 classes, 8 things),
    batch 16, 90k iterations, poly schedule, no warmup, the semantic pipeline (shortest edge
    0.5-2.0 x 1024, max 4096, 512x1024 crops, SSD colour jitter, flip), 100 queries, test at
    1024 (max 2048) with semantic, instance and panoptic inference all on (thresholds 0.8)."""
    cfg = _mask2former(_panoptic(name, 19, "cityscapes-panoptic", backbone=backbone, enc_layers=0, crop=(512, 1024),
                                 max_iter=90000))
    cfg.test.semantic_on = cfg.test.instance_on = cfg.test.panoptic_on = True
    return cfg


# Official EoMT iterations per epoch (4 GPUs x 4 images; from the configs' annealing steps).
_EOMT_EPOCH_ITERS = {"coco-panoptic": 7391, "coco-instance": 7391, "ade20k-150": 1264, "ade20k-panoptic": 1264,
                     "ade20k-full-847": 1264, "cityscapes": 186}
_EOMT_DEPTH_BLOCKS = {"s": ("small", 3), "b": ("base", 3), "l": ("large", 4), "g": ("giant", 5), "h": ("huge_plus", 4)}


def _eomt_name(dataset: str, vit: str, size: int, schedule: str = "") -> str:
    return f"eomt-{dataset}-{vit}-{size}" + (f"-{schedule}" if schedule else "")


def _eomt(dataset: str, vit: str, size: int, epochs: int, annealing: tuple, queries: int = 200,
          schedule: str = "") -> Config:
    """An official EoMT config (tue-mps/eomt ``configs/{dinov2,dinov3}/<dataset>/<task>/eomt_<size>_<img>.yaml``):
    ``vit`` "dinov2-l" etc. (ViT S/B/L/g, queries in the last 3/3/4/5 blocks), ``size`` the
    square input (crop and test size), ``annealing`` the mask-annealing (start, end) steps per
    query block (power 0.9). Recipe (``training/lightning_module.py`` defaults, ``main.py``): batch 16, AdamW
    lr 1e-4 (DINOv3 2e-4), weight decay 0.05 on every parameter, layer-wise lr decay 0.8 over
    the ViT blocks (DINOv2: the query blocks too; DINOv3, ``llrd_l2_enabled: False``: the query
    blocks keep the full lr; DINOv3 ADE20K: ``llrd: 1.0``, no decay), the two-stage warm-up
    (heads 500 iterations, then the ViT 1000; DINOv3 2000 + 3000) then poly 0.9 per iteration,
    clipping 0.01, class 2 / BCE 5 / dice 5 / no-object 0.1 on 12544 points (oversample 3,
    importance 0.75), test thresholds 0.8. Not expressible here: fp16 mixed precision (``amp``
    is bf16 here), DINOv3's delta-weight fine-tuning. (The DINOv3 ADE20K config's ``lr_mult:
    0.1`` changes no learning rate in the official optimizer: its branch is unreachable; with
    ``llrd: 1.0`` every ViT parameter gets the full lr, as here.)"""
    family, letter = vit.split("-")
    width, num_blocks = _EOMT_DEPTH_BLOCKS[letter]
    task = {"coco-instance": "instance", "ade20k-150": "semantic", "ade20k-full-847": "semantic",
            "cityscapes": "semantic"}.get(dataset, "panoptic")
    cfg = Config(name=_eomt_name(dataset, vit, size, schedule))
    m = cfg.model
    m.meta_arch, m.num_queries, m.num_blocks, m.patch_size, m.size_divisibility = "eomt", queries, num_blocks, 16, 16
    m.backbone.name, m.backbone.img_size, m.backbone.freeze_bn = f"{family}_{width}", size, False
    m.num_classes = {"coco-panoptic": 133, "coco-instance": 80, "cityscapes": 19, "ade20k-full-847": 847}.get(dataset, 150)
    m.mask_annealing_start, m.mask_annealing_end, m.mask_annealing_power = *annealing, 0.9
    m.dropout = 0.0
    loss = cfg.loss
    loss.class_weight, loss.mask_weight, loss.dice_weight, loss.no_object_weight = 2.0, 5.0, 5.0, 0.1
    loss.mask_loss, loss.mask_sampling = "bce", "points"
    loss.num_points, loss.oversample_ratio, loss.importance_sample_ratio = 12544, 3.0, 0.75
    s = cfg.solver
    s.batch_size, s.max_iter, s.poly_power = 16, epochs * _EOMT_EPOCH_ITERS[dataset], 0.9
    s.lr_scheduler = "two_stage_poly"
    s.lr = 2e-4 if family == "dinov3" else 1e-4
    s.weight_decay = s.weight_decay_norm = s.weight_decay_embed = 0.05
    s.backbone_multiplier, s.clip_grad_norm, s.amp = 1.0, 0.01, True
    s.warmup_iters, s.backbone_warmup_iters = (2000, 3000) if family == "dinov3" else (500, 1000)
    s.layer_decay = 1.0 if (family, dataset) == ("dinov3", "ade20k-150") else 0.8
    s.layer_decay_query_blocks = family == "dinov2"
    d = cfg.data
    d.dataset, d.task, d.crop_size = dataset, task, (size, size)
    d.ignore_label = 65535 if dataset == "ade20k-full-847" else 255
    # the official pipeline of every dataset (datasets/transforms.py): jitter, flip, scale jitter,
    # black padding, square crop; colour jitter and scales per dataset (datasets/<dataset>.py)
    d.augmentation = "eomt"
    d.color_jitter = not dataset.startswith("coco")
    d.jitter_scale = (0.5, 2.0) if task == "semantic" else (0.1, 2.0)
    t = cfg.test
    t.semantic_on, t.panoptic_on, t.instance_on = task == "semantic", task == "panoptic", task == "instance"
    t.object_mask_threshold = t.overlap_threshold = 0.8
    return cfg


def _eomt_test_sizes(cfg: Config) -> Config:
    """Official EoMT inference: panoptic/instance images resized to fit the square input size (then
    padded), semantic images with their shorter side at the input size (then windowed)."""
    size = cfg.data.crop_size[0]
    cfg.data.min_size_test, cfg.data.test_resize = size, "eomt"
    if cfg.data.task != "semantic":
        cfg.data.max_size_test = size
    return cfg


# Annealing steps of the official configs (per query block), by schedule.
_COCO_L = ((14782, 29564, 44346, 59128), (29564, 44346, 59128, 73910))
_COCO_SB = ((14782, 36955, 59128), (29564, 51737, 73910))
_COCO_SB_2X = ((29564, 73910, 118256), (59128, 103474, 147820))
_COCO_G = ((14782, 25869, 36955, 48042, 59128), (29564, 40651, 51737, 62824, 73910))
_ADE_L = ((6520, 13040, 19560, 26080), (13040, 19560, 26080, 32600))
_ADE_G = ((6520, 11410, 16300, 21190, 26080), (13040, 17930, 22820, 27710, 32600))
_CITYSCAPES_L = ((3317, 6634, 9951, 13268), (6634, 9951, 13268, 16585))
_COCO_L_V3 = ((0, 29564, 44346, 59128), (3000, 44346, 59128, 73910))
_COCO_SB_2X_V3 = ((0, 73910, 118256), (3000, 103474, 147820))
_ADE_L_V3 = ((0, 6520, 9780, 13040), (3000, 9780, 13040, 16300))

_EOMT_PRESETS = [  # (dataset, vit, size, epochs, annealing, queries, schedule); DINOv3 1280: see README
    ("coco-panoptic", "dinov2-s", 640, 12, _COCO_SB, 200, ""),
    ("coco-panoptic", "dinov2-b", 640, 12, _COCO_SB, 200, ""),
    ("coco-panoptic", "dinov2-s", 640, 24, _COCO_SB_2X, 200, "2x"),
    ("coco-panoptic", "dinov2-b", 640, 24, _COCO_SB_2X, 200, "2x"),
    ("coco-panoptic", "dinov2-l", 640, 12, _COCO_L, 200, ""),
    ("coco-panoptic", "dinov2-g", 640, 12, _COCO_G, 200, ""),
    ("coco-panoptic", "dinov2-l", 1280, 12, _COCO_L, 200, ""),
    ("coco-panoptic", "dinov2-g", 1280, 12, _COCO_G, 200, ""),
    ("coco-instance", "dinov2-l", 640, 12, _COCO_L, 200, ""),
    ("coco-instance", "dinov2-l", 1280, 12, _COCO_L, 200, ""),
    ("ade20k-150", "dinov2-l", 512, 31, _ADE_L, 100, ""),
    ("ade20k-full-847", "dinov2-l", 512, 31, _ADE_L, 100, ""),  # ours: the ADE20K-150 recipe, 847 classes
    ("ade20k-panoptic", "dinov2-l", 640, 31, _ADE_L, 200, ""),
    ("ade20k-panoptic", "dinov2-g", 640, 31, _ADE_G, 200, ""),
    ("ade20k-panoptic", "dinov2-l", 1280, 31, _ADE_L, 200, ""),
    ("ade20k-panoptic", "dinov2-g", 1280, 31, _ADE_G, 200, ""),
    ("cityscapes", "dinov2-l", 1024, 107, _CITYSCAPES_L, 100, ""),
    ("coco-panoptic", "dinov3-s", 640, 24, _COCO_SB_2X_V3, 200, "2x"),
    ("coco-panoptic", "dinov3-b", 640, 24, _COCO_SB_2X_V3, 200, "2x"),
    ("coco-panoptic", "dinov3-l", 640, 12, _COCO_L_V3, 200, ""),
    ("coco-panoptic", "dinov3-l", 1280, 12, _COCO_L_V3, 200, ""),
    ("coco-instance", "dinov3-l", 640, 12, _COCO_L, 200, ""),
    ("coco-instance", "dinov3-l", 1280, 12, _COCO_L, 200, ""),
    ("ade20k-150", "dinov3-l", 512, 16, _ADE_L_V3, 100, ""),
]


_PRESETS = {
    "ade20k-150-r50": lambda: _semantic("ade20k-150-r50", 150),
    "ade20k-150-r101": lambda: _semantic("ade20k-150-r101", 150, "resnet101"),
    "ade20k-150-r101c": lambda: _semantic("ade20k-150-r101c", 150, "resnet101c"),
    "ade20k-150-swin-t": lambda: _semantic("ade20k-150-swin-t", 150, "swin_tiny"),
    "ade20k-150-swin-s": lambda: _semantic("ade20k-150-swin-s", 150, "swin_small"),
    "ade20k-150-swin-b": lambda: _semantic("ade20k-150-swin-b", 150, "swin_base", crop=640),
    "ade20k-150-swin-l": lambda: _semantic("ade20k-150-swin-l", 150, "swin_large", crop=640),
    "ade20k-150-perpixel-r50": lambda: _meta(_semantic("ade20k-150-perpixel-r50", 150), "per_pixel_baseline"),
    "ade20k-150-perpixelplus-r50": lambda: _meta(
        _semantic("ade20k-150-perpixelplus-r50", 150), "per_pixel_baseline_plus"
    ),
    "ade20k-full-847-r50": lambda: _semantic(
        "ade20k-full-847-r50", 847, ignore=65535, dataset="ade20k-full-847", max_iter=200000
    ),
    "coco-stuff-10k-r50": lambda: _semantic(
        "coco-stuff-10k-r50", 171, crop=640, dataset="coco-stuff-10k", max_iter=60000, batch_size=32
    ),
    "cityscapes-r101": lambda: _semantic(
        "cityscapes-r101", 19, "resnet101", crop=(512, 1024), dataset="cityscapes", max_iter=90000
    ),
    "mapillary-r50": lambda: _semantic(
        "mapillary-r50", 65, crop=1280, dataset="mapillary", max_iter=300000
    ),
    "coco-panoptic-r50": lambda: _coco_panoptic("coco-panoptic-r50"),
    "coco-panoptic-swin-l": lambda: _coco_panoptic(
        "coco-panoptic-swin-l", backbone="swin_large", enc_layers=0, max_size_train=1000
    ),
    "ade20k-panoptic-r50": lambda: _panoptic(
        "ade20k-panoptic-r50", 150, "ade20k-panoptic", threshold=0.7, max_iter=720000
    ),
    # Mask2Former (configs/*/maskformer2_*.yaml).
    "mask2former-ade20k-150-r50": lambda: _mask2former(_semantic("ade20k-150-r50", 150)),
    "mask2former-ade20k-150-r101": lambda: _mask2former(_semantic("ade20k-150-r101", 150, "resnet101")),
    "mask2former-ade20k-150-swin-t": lambda: _mask2former(_semantic("ade20k-150-swin-t", 150, "swin_tiny")),
    "mask2former-ade20k-150-swin-s": lambda: _mask2former(_semantic("ade20k-150-swin-s", 150, "swin_small")),
    "mask2former-ade20k-150-swin-b": lambda: _mask2former(_semantic("ade20k-150-swin-b", 150, "swin_base", crop=640)),
    "mask2former-ade20k-150-swin-l": lambda: _mask2former(_semantic("ade20k-150-swin-l", 150, "swin_large", crop=640)),
    "mask2former-ade20k-full-847-r50": lambda: _mask2former(_semantic(
        "ade20k-full-847-r50", 847, ignore=65535, dataset="ade20k-full-847", max_iter=200000)),
    "mask2former-ade20k-panoptic-r50": lambda: _mask2former(_panoptic(
        "ade20k-panoptic-r50", 150, "ade20k-panoptic", enc_layers=0, max_iter=160000)),
    "mask2former-cityscapes-r50": lambda: _mask2former(_semantic(
        "cityscapes-r50", 19, crop=(512, 1024), dataset="cityscapes", max_iter=90000)),
    "mask2former-mapillary-r50": lambda: _mask2former(_semantic(
        "mapillary-r50", 65, crop=1024, dataset="mapillary", max_iter=300000)),
    "mask2former-coco-panoptic-r50": lambda: _m2f_coco("coco-panoptic-r50", "panoptic"),
    "mask2former-coco-panoptic-swin-l": lambda: _m2f_coco("coco-panoptic-swin-l", "panoptic", "swin_large", 200, 100),
    "mask2former-coco-instance-r50": lambda: _m2f_coco("coco-instance-r50", "instance"),
    "mask2former-cityscapes-panoptic-r50": lambda: _m2f_cityscapes_panoptic("cityscapes-panoptic-r50"),
}
_PRESETS.update({_eomt_name(p[0], p[1], p[2], p[6]): (lambda p=p: _eomt(*p)) for p in _EOMT_PRESETS})


def _meta(cfg: Config, meta_arch: str) -> Config:
    cfg.model.meta_arch = meta_arch
    if meta_arch == "per_pixel_baseline_plus":
        cfg.model.num_queries = cfg.model.num_classes
    return cfg


def _apply_dataset_defaults(cfg: Config) -> Config:
    # Official per-dataset input sizes: Cityscapes trains up to 4096 and tests on the whole
    # image; COCO-Stuff trains up to 2560; Mapillary scales from a 2048 base up to 8192, tests
    # with the longer side 2048 and ignores label 65; COCO panoptic and instance test at 800/1333.
    if cfg.data.dataset in ("cityscapes", "cityscapes-panoptic"):
        cfg.data.max_size_train = 4096
        cfg.data.min_size_test, cfg.data.max_size_test = 1024, 2048
    if cfg.data.dataset == "coco-stuff-10k":
        cfg.data.max_size_train = 2560
    if cfg.data.dataset == "mapillary":
        cfg.data.base_size_train, cfg.data.max_size_train = 2048, 8192
        cfg.data.min_size_test, cfg.data.max_size_test = 2048, 2048
        cfg.data.ignore_label = 65
    if cfg.data.dataset in ("coco-panoptic", "coco-instance"):
        cfg.data.min_size_test, cfg.data.max_size_test = 800, 1333
    if cfg.data.dataset == "ade20k-panoptic":  # the semantic pipeline at 640 crops
        cfg.data.max_size_train = 2560
        cfg.data.min_size_test, cfg.data.max_size_test = 640, 2560
    if cfg.model.meta_arch == "eomt":
        _eomt_test_sizes(cfg)
    return cfg


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_config(name: str = "ade20k-150-r50") -> Config:
    """A fresh copy of a named preset (see ``list_presets()``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return copy.deepcopy(_apply_dataset_defaults(_PRESETS[name]()))
