"""Mask2Former through the shared engine: training with the point-sampled criterion, exact resume
(the criterion's point generator is checkpointed per rank), semantic / panoptic / instance
inference and TTA through the same fused ops as MaskFormer."""
import torch

from engine_tiny import as_mask2former, make_data, tiny_config
from fastmaskformer.engine.predictor import infer, semantic_tta
from fastmaskformer.engine.trainer import Trainer


def tiny_m2f(data_root, **solver):
    return as_mask2former(tiny_config(data_root, **solver))


def test_train_resume_exact_and_infer(tmp_path):
    torch.set_num_threads(1)
    data = make_data(tmp_path / "data", num_train=8, num_val=2)
    cfg = tiny_m2f(data, max_iter=3, checkpoint_period=2)
    full = Trainer(cfg, tmp_path / "full", device="cpu", progress=False, num_workers=0)
    full.train()
    ckpt = tmp_path / "full" / "model_0000002.pt"
    state = torch.load(ckpt, weights_only=False)
    assert "criterion" in state["rng"][0]  # the point generator's state, per rank
    resumed = Trainer(cfg, tmp_path / "resumed", device="cpu", progress=False, num_workers=0, resume=ckpt)
    assert resumed.iteration == 2
    resumed.train()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name

    model = full.model.eval()
    images = [torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8), torch.randint(0, 255, (3, 48, 64),
                                                                                        dtype=torch.uint8)]
    cfg.test.instance_topk = 5
    results = infer(model, images, [(64, 80), (50, 70)], cfg.test, tasks=("semantic", "panoptic", "instance"),
                    thing_classes=range(10))
    assert results[1]["semantic"].shape == (50, 70)
    assert results[0]["panoptic"][0].shape == (64, 80)
    assert results[0]["instance"]["masks"].shape[0] == 5
    cfg.test.panoptic_on = True  # official: with panoptic on, instances are thing classes only
    results = infer(model, images, [(64, 80), (50, 70)], cfg.test, tasks=("instance",), thing_classes=range(3))
    for r in results:
        inst = r["instance"]
        assert bool((inst["labels"] < 3).all()) and inst["masks"].shape[0] == inst["scores"].shape[0] <= 5
    cfg.test.aug_scales, cfg.test.aug_flip = (48, 64), True
    assert semantic_tta(model, images[0], (64, 80), cfg.test).shape == (64, 80)


def test_panoptic_keeps_only_confident_won_pixels_as_the_official(tmp_path):
    """Official Mask2Former ``panoptic_inference``: a segment is the pixels its query wins *and*
    where its mask probability is >= 0.5 (MaskFormer's rule keeps every won pixel); the same
    rule as EoMT's, so the official reference of test_eomt_inference applies."""
    from types import SimpleNamespace

    from test_eomt_inference import official_panoptic
    from fastmaskformer.modeling import build_model
    from fastmaskformer.engine.predictor import run_model
    from fastmaskformer.ops.inference import resized_mask_logits_reference

    torch.manual_seed(0)
    cfg = tiny_m2f(tmp_path)
    model = build_model(cfg.model).eval()
    assert model.panoptic_confident_pixels
    images = [torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8), torch.randint(0, 255, (3, 48, 64),
                                                                                        dtype=torch.uint8)]
    output_sizes, things = [(64, 80), (50, 70)], set(range(5))
    test_cfg = SimpleNamespace(object_mask_threshold=0.0, overlap_threshold=0.3)
    with torch.no_grad():
        results = infer(model, images, output_sizes, test_cfg, tasks=("panoptic",), thing_classes=sorted(things))
        alone = [run_model(model, [image]) for image in images]  # they pad to different sizes: run alone
    voided = 0
    for result, (outputs, sizes, input_size), output_size in zip(results, alone, output_sizes):
        logits = resized_mask_logits_reference(outputs.mask_embed[-1, 0], outputs.pixel_embed[0], sizes[0],
                                               output_size, input_size)
        sem, _ = official_panoptic(logits, outputs.class_logits[-1, 0], 0.0, 0.3, things)
        ids, info = result["panoptic"]
        category = {s["id"]: s["category_id"] for s in info}
        got = torch.tensor([category.get(int(i), -1) for i in ids.flatten()]).view(ids.shape)
        assert torch.equal(got, sem)
        voided += int((sem == -1).sum())
    assert voided > 0  # pixels MaskFormer's rule would have given to a segment
