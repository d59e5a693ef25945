"""benchmarks/bench_train_step.py and bench_inference_e2e.py --arch eomt: the transformers
provider is the same network as ours (ours is converted from it), its training step runs HF's
own loss, and both inference providers give the same semantic maps."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
transformers = pytest.importorskip("transformers")

TINY_VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2}


def _small_config():
    import bench_train_step as bench

    cfg = bench.config_for(SimpleNamespace(preset="ade20k-150-r50", arch="eomt", queries=8, classes=5, size=64))
    assert cfg.name == bench.EOMT_DEFAULT_PRESET and cfg.model.meta_arch == "eomt"
    cfg.model.backbone.kwargs, cfg.model.num_blocks = dict(TINY_VIT), 2
    cfg.loss.num_points = 256
    return bench, cfg


def test_transformers_twin_has_our_weights_with_masking():
    bench, cfg = _small_config()
    ours, hf = bench.base_models(cfg)
    assert type(ours).__name__ == "EoMT" and ours.mask_annealing.probs == [1.0, 1.0]
    assert hf.config.num_blocks == 2 and hf.config.hidden_size == 64 and hf.config.train_num_points == 256
    images, _ = bench.random_batch(2, 64, cfg.model.num_classes, 3, torch.device("cpu"))
    ours.eval(), hf.eval()
    with torch.no_grad():
        out, ref = ours(images), hf(pixel_values=images)
    torch.testing.assert_close(out.class_logits[-1], ref.class_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.pred_masks(-1), ref.masks_queries_logits, rtol=1e-4, atol=1e-4)


def test_transformers_step_uses_its_loss_on_every_prediction():
    bench, cfg = _small_config()
    ours, hf = bench.base_models(cfg)
    device = torch.device("cpu")
    images, targets = bench.random_batch(2, 64, cfg.model.num_classes, 3, device)
    model, criterion, optimizer = bench.build(cfg, "transformers", device, hf)
    assert criterion is None and model is not hf
    before = [p.detach().clone() for p in model.parameters()]
    hf_loss = float(bench.make_hf_step(model, optimizer, images, targets, False, device)())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    losses = {}
    for provider in ("eager", "batched"):  # the official-style step (scipy per image) and ours
        model, criterion, optimizer = bench.build(cfg, provider, device, ours)
        assert criterion.matcher.solver == bench.PROVIDERS[provider][1]
        losses[provider] = float(bench.make_step(model, criterion, optimizer, images, targets, False, device)())
    assert losses["eager"] == pytest.approx(losses["batched"], rel=1e-5)
    # 3 predictions (2 intermediate + final) in both sums; only the random points differ
    assert abs(hf_loss - losses["eager"]) / losses["eager"] < 0.1, (hf_loss, losses)


def test_inference_providers_agree():
    import bench_inference_e2e as e2e
    from transformers import EomtImageProcessor

    from fastmaskformer import ops

    bench, cfg = _small_config()
    ours, hf = bench.base_models(cfg)
    with torch.no_grad():
        hf.attn_mask_probs.zero_()
    ours.mask_annealing.probs = [0.0, 0.0]
    ours.eval(), hf.eval()
    images = torch.randn(2, 3, 64, 64)
    processor = EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    mine = e2e.infer(ours, images, "semantic", "torch", False)  # [H, W] labels per image
    theirs = e2e.hf_infer(hf, processor, images, "semantic", False)
    with torch.no_grad():
        out = ours(images)
        scores = processor.post_process_semantic_segmentation(hf(pixel_values=images), [(64, 64)] * 2,
                                                              return_segmentation_scores=True)
    _, my_scores = zip(*ops.semantic_inference(out.class_logits[-1], out.mask_embed[-1], out.pixel_embed[-1],
                                               [(64, 64)] * 2, return_score=True, impl="torch"))
    for a, b, score, ref in zip(mine, theirs, my_scores, scores):
        torch.testing.assert_close(score, ref.segmentation_scores.max(0).values, rtol=1e-4, atol=1e-5)
        assert (a == b).float().mean() > 0.99  # labels: equal but for near-ties
    panoptic = e2e.hf_infer(hf, processor, images, "panoptic", False)
    assert len(panoptic) == 2 and panoptic[0]["segments_info"]  # threshold 0: segments kept
