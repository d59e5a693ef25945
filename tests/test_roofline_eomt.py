"""benchmarks/roofline.py, EoMT rows: the attention FLOPs it adds (SDPA has no CPU FLOP formula)
equal an explicit matmul attention's count, and the step / inference predictions are built from
the right parts (ViT-S at 128 px here, not the committed ViT-L 640)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture
def roofline(monkeypatch):
    import roofline

    monkeypatch.setitem(roofline.EOMT_STEP, "preset", "eomt-coco-panoptic-dinov2-s-640")
    monkeypatch.setitem(roofline.EOMT_STEP, "size", 128)
    return roofline


def test_attention_flops_match_explicit_attention(roofline):
    from torch.utils.flop_counter import FlopCounterMode

    vit = dict(depth=3, width=32, query_blocks=1, tokens=10, tokens_with_queries=14)
    counter = FlopCounterMode(display=False)
    with counter:
        for n in (10, 10, 14):
            q = k = v = torch.randn(2, 4, n, 8)  # 2 images, 4 heads x 8 = width 32
            (q @ k.transpose(-1, -2)).softmax(-1) @ v
    assert roofline._attention_flops(vit, 2) == counter.get_total_flops()


def test_eomt_step_and_inference_predictions(roofline):
    profiles = roofline.eomt_profiles()
    vit = profiles["train"]["vit"]
    assert vit["depth"] == 12 and vit["query_blocks"] == 3 and vit["tokens"] == 5 + 64
    assert profiles["train"]["flops"][""]["sdpa"] == 4 * profiles["inference"]["flops"][""]["sdpa"]  # B 4 vs 1
    hw = dict(roofline.HARDWARE["H100"], tag="H100")
    steps = {code: roofline.eomt_step(hw, profiles["train"], code)
             for code in ("official", "ours", "ours+checkpointing")}
    assert steps["ours"]["parts_ms"]["criterion (point loss + matching cost)"] < \
        steps["official"]["parts_ms"]["criterion (point loss + matching cost)"]
    assert steps["ours"]["memory_gb"] < steps["official"]["memory_gb"]  # no per-prediction mask logits kept
    assert steps["ours+checkpointing"]["memory_gb"] < steps["ours"]["memory_gb"]
    assert steps["ours+checkpointing"]["parts_ms"]["ViT + heads"] == pytest.approx(
        4 / 3 * steps["ours"]["parts_ms"]["ViT + heads"])
    fast, slow = (roofline.eomt_inference(hw, profiles["inference"], mfu) for mfu in (0.4, 0.2))
    assert fast["model_ms"] == pytest.approx(slow["model_ms"] / 2) and fast["post_ms"] == slow["post_ms"] > 0
    assert fast["fps"] < fast["fps_model_only"]
