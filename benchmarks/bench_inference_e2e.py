"""End-to-end inference: model forward + semantic (K = 150, 847) or panoptic post-processing,
images/s and peak memory, reference torch ops vs fused Triton kernels, side by side.

``--arch mask2former``: the ``mask2former-<preset>`` model (ours: forward + our post-processing,
the fused kernels on CUDA, the torch reference on the CPU) beside transformers'
``Mask2FormerForUniversalSegmentation`` with the same weights (ours is converted from it, as in
``bench_train_step.py``) and its image processor's ``post_process_semantic_segmentation`` /
``post_process_panoptic_segmentation``. Both keep every query (object threshold 0, overlap 0.8,
classes >= 80 are stuff); the semantic rows also give the share of pixels whose label agrees
with ours, the panoptic rows the segments found per image (transformers resamples the mask logits to 384 x 384 before the output size, we do not).
``--kept-queries N`` (default 3): at random weights every query keeps the same class and its
mask logits are negative nearly everywhere, so the overlap rule drops every segment; both models
then get the same two bias edits (``keep_queries``): the mask head's output centred so that the
mean mask logit is 0, and the "no object" bias raised until N queries of the first image keep a
real class, then both class heads scaled by one factor until those queries' scores reach 0.9
(transformers counts a segment's area where score * probability >= 0.5); -1 leaves the weights
as they are. On the CPU the providers of a task are timed in interleaved rounds.

``--arch eomt``: an ``eomt-*`` preset (default ``eomt-coco-panoptic-dinov2-s-640``; ``--preset``
names another) with masking off (a trained model), ours (our EoMT + our post-processing) vs
transformers' ``EomtForUniversalSegmentation`` + its ``EomtImageProcessor`` post-processing, the
same weights (ours converted from HF), semantic and panoptic, the same thresholds and rows.

GPU:  python benchmarks/bench_inference_e2e.py --device cuda --size 512 --batch 16
      python benchmarks/bench_inference_e2e.py --device cuda --arch eomt --preset eomt-coco-panoptic-dinov2-l-640 \
          --size 640 --batch 8 --classes 133 --amp
CPU:  python benchmarks/bench_inference_e2e.py --device cpu --size 128 --batch 2
      python benchmarks/bench_inference_e2e.py --device cpu --arch mask2former --size 512 --batch 1 \
          --classes 150 [--cpu-memory]
      python benchmarks/bench_inference_e2e.py --device cpu --arch eomt --size 256 --batch 2 --classes 133
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_matching_cost import time_providers  # noqa: E402
from common import measure, report, result_path, track_cpu_memory  # noqa: E402

import fastmaskformer as fmf  # noqa: E402
from fastmaskformer import ops  # noqa: E402

NUM_THINGS = 80  # panoptic rows: classes below are things, the rest stuff (COCO's split)


def infer(model, images, task: str, impl: str, amp: bool):
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(images)
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    last = (out.class_logits[-1].float(), out.mask_embed[-1].float(), ops.final_pixel_embed(out.pixel_embed).float())
    if task == "semantic":
        return ops.semantic_inference(*last, sizes, impl=impl)
    return ops.panoptic_inference(*last, sizes, object_mask_threshold=0.0, thing_classes=range(NUM_THINGS), impl=impl)


def hf_infer(model, processor, images, task: str, amp: bool):
    """transformers' forward and its image processor's post-processing (labels [H, W] per image
    for semantic, its panoptic dicts otherwise; Mask2Former's processor fuses stuff by
    ``label_ids_to_fuse``, EoMT's takes ``stuff_classes``)."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(pixel_values=images)
    out.masks_queries_logits, out.class_queries_logits = out.masks_queries_logits.float(), out.class_queries_logits.float()
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    if task == "semantic":
        return processor.post_process_semantic_segmentation(out, target_sizes=sizes)
    stuff = list(range(NUM_THINGS, out.class_queries_logits.shape[-1] - 1))
    fuse = {"stuff_classes": stuff} if model.config.model_type.startswith("eomt") else {"label_ids_to_fuse": set(stuff)}
    return processor.post_process_panoptic_segmentation(out, threshold=0.0, overlap_mask_area_threshold=0.8,
                                                        target_sizes=sizes, **fuse)


def segments_per_image(result) -> float:
    """Panoptic segments per image, ours ((id map, segments_info) pairs) or transformers' dicts."""
    return sum(len(r["segments_info"] if isinstance(r, dict) else r[1]) for r in result) / len(result)


def keep_queries(ours, hf, images, count: int) -> float:
    """Make the panoptic rows find segments at random weights, the same edit in both models (ours
    is converted from ``hf``): (1) the mask embedding head's last bias moves every query's
    embedding by one vector along the first image's mean pixel embedding, so that the mean mask
    logit of its last prediction is 0 (at random weights nearly every logit is negative: no
    pixel reaches probability 0.5 and the overlap rule drops every query); (2) the "no object"
    bias of the class heads rises so that exactly ``count`` queries of the first image have a real
    class as their argmax at the last prediction, those whose best real-class logit leads "no
    object" by the most. Returns the "no object" shift."""
    with torch.no_grad():
        out = ours(images[:1])
        pixels = ops.final_pixel_embed(out.pixel_embed)[0].float()  # [C, h, w]
        mean_logit = torch.einsum("qc,chw->", out.mask_embed[-1, 0].float(), pixels) / (
            out.mask_embed.shape[2] * pixels[0].numel())
        direction = pixels.mean((1, 2))
        move = -mean_logit * direction / direction.dot(direction)
        hf_mask = hf.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0")
        for bias in (ours.predictor.mask_embed.layers[-1].bias, hf_mask.bias):
            bias += move.to(bias.dtype)
        logits = ours(images[:1]).class_logits[-1, 0].float()  # [Q, K+1]
        margin = (logits[:, :-1].max(-1).values - logits[:, -1]).sort(descending=True).values
        if not 0 <= count <= margin.numel():
            raise SystemExit(f"--kept-queries must be in [0, {margin.numel()}], got {count}")
        upper = float(margin[count - 1]) if count > 0 else float(margin[0]) + 1.0
        lower = float(margin[count]) if count < margin.numel() else upper - 2.0
        shift = (upper + lower) / 2  # between the count-th and the next margin
        heads = (ours.predictor.class_embed, hf.class_predictor)
        for head in heads:
            head.bias[-1] += shift
        # (3) a sharper class softmax (both heads scaled by one factor: the argmaxes stay) until the
        # kept queries' scores reach 0.9: transformers' post-processing tests score * probability
        # >= 0.5 for a segment's area, so at random weights' scores (~1/K) it finds none
        for _ in range(12):
            scores = ours(images[:1]).class_logits[-1, 0].float().softmax(-1).max(-1)
            real = scores.indices != logits.shape[-1] - 1
            if count == 0 or float(scores.values[real].min()) >= 0.9:
                break
            for head in heads:
                head.weight *= 3.0
                head.bias *= 3.0
        kept = int((ours(images[:1]).class_logits[-1, 0].argmax(-1) != logits.shape[-1] - 1).sum())
    if kept != count:
        raise RuntimeError(f"--kept-queries {count}: {kept} queries keep a class after the shift (margins tie)")
    return shift


def twin_rows(args, device, images) -> list[dict]:
    """``--arch mask2former`` / ``eomt``: ours (each impl) and transformers', same weights, per K
    and task."""
    import bench_train_step
    from transformers import EomtImageProcessor, Mask2FormerImageProcessor

    impls = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    if args.arch == "eomt":
        processor = EomtImageProcessor(size={"shortest_edge": args.size, "longest_edge": args.size})
    else:
        processor = Mask2FormerImageProcessor()
    rows = []
    for num_classes in args.classes:
        cfg = bench_train_step.config_for(argparse.Namespace(preset=args.preset, arch=args.arch, queries=None,
                                                             classes=num_classes, size=args.size))
        ours, hf = bench_train_step.base_models(cfg)
        if hf is None:
            raise SystemExit(f"--arch {args.arch} needs transformers and a ResNet-50/101 Mask2Former or DINOv2 EoMT "
                             f"preset, got {cfg.name}")
        if args.arch == "eomt":  # a trained model: no masks, no intermediate predictions
            with torch.no_grad():
                hf.attn_mask_probs.zero_()
            ours.mask_annealing.probs = [0.0] * len(ours.mask_annealing.probs)
        else:
            hf.config.output_auxiliary_logits = False
        ours, hf = ours.to(device).eval(), hf.to(device).eval()
        shift = None
        if args.kept_queries is not None:
            shift = keep_queries(ours, hf, images, args.kept_queries)
        for task in ("semantic", "panoptic"):
            runs = {f"ours ({impl})": (lambda impl=impl: infer(ours, images, task, impl, args.amp)) for impl in impls}
            runs["transformers"] = lambda: hf_infer(hf, processor, images, task, args.amp)
            # one untimed run each: the semantic labels' agreement with ours, the panoptic segment counts
            results = {name: fn() for name, fn in runs.items()}
            ours_name = next(iter(runs))
            if device.type == "cpu":  # rounds of one call each: load and drift hit every provider alike
                timings = time_providers(runs, device, rounds=args.repeats, warmup=0)  # the runs above warmed up
            else:
                timings = {name: measure(fn, device, warmup=0, repeats=args.repeats) for name, fn in runs.items()}
            for name, fn in runs.items():
                timing = timings[name]
                row = {"task": task, "K": num_classes, "impl": name, "batch": args.batch, "size": args.size,
                       **timing, "images_per_s": args.batch / (timing["median_ms"] / 1e3)}
                if shift is not None:
                    row.update(kept_queries=args.kept_queries, no_object_bias_shift=shift)
                if task == "semantic":
                    row["label_agreement"] = float(torch.stack(list(results[name])).eq(
                        torch.stack(list(results[ours_name])).to(torch.int64)).float().mean())
                else:
                    row["segments_per_image"] = segments_per_image(results[name])
                rows.append(row)
        del ours, hf
    return rows


def maskformer_rows(args, device, images) -> list[dict]:
    impls = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    rows = []
    for num_classes in args.classes:
        cfg = fmf.get_config(args.preset)
        cfg.model.num_classes = num_classes
        cfg.model.backbone.img_size = args.size
        torch.manual_seed(0)
        model = fmf.build_model(cfg.model).to(device).eval()
        for task in ("semantic", "panoptic"):
            for impl in impls:
                timing = measure(lambda: infer(model, images, task, impl, args.amp), device, warmup=1,
                                 repeats=args.repeats)
                rows.append({"task": task, "K": num_classes, "impl": impl, "batch": args.batch, "size": args.size,
                             **timing, "images_per_s": args.batch / (timing["median_ms"] / 1e3)})
        del model
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["maskformer", "mask2former", "eomt"], default="maskformer",
                   help="mask2former / eomt: ours vs transformers' model + post-processing, same weights "
                        "(eomt: an eomt-* --preset, default eomt-coco-panoptic-dinov2-s-640)")
    p.add_argument("--preset", default="ade20k-150-r50")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes", type=int, nargs="+", default=[150, 847])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model forward")
    p.add_argument("--kept-queries", type=int, default=3, metavar="N",
                   help="--arch mask2former: shift both models' 'no object' bias (the same shift) so that N "
                        "queries of the first image keep a real class, so that the panoptic rows find segments "
                        "(default 3; -1: the random weights as they are)")
    p.add_argument("--cpu-memory", action="store_true",
                   help="CPU: also report peak memory (a fixed glibc mmap threshold slows allocation: time "
                        "such a run separately)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.kept_queries is not None and (args.kept_queries < 0 or args.arch != "mask2former"):
        args.kept_queries = None
    device = torch.device(args.device)
    if device.type == "cpu" and args.cpu_memory:
        track_cpu_memory()
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = (maskformer_rows if args.arch == "maskformer" else twin_rows)(args, device, images)
    columns = ["task", "K", "impl", "batch", "size", "median_ms", "p20_ms", "p80_ms", "images_per_s", "peak_mem_mib"]
    if args.arch != "maskformer":
        columns += ["label_agreement", "segments_per_image"]
    if args.kept_queries is not None:
        columns += ["kept_queries"]
    name = "inference-e2e" + ("" if args.arch == "maskformer" else f"-{args.arch}") + ("-memory" if args.cpu_memory else "")
    path = args.json or result_path(name, device)
    report(path, rows, device, columns, {"args": vars(args)})


if __name__ == "__main__":
    main()
