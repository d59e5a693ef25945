"""torch.compile readiness: the model forward and the criterion's loss region trace without graph
breaks (the matcher's device->host copy lives inside the solver operator), and a short CPU
training run with ``solver.compile`` gives the eager run's losses."""
import json

import pytest
import torch
import torch._dynamo

import fastmaskformer as fmf
from engine_tiny import make_data, tiny_config
from fastmaskformer.engine.trainer import Trainer
from fastmaskformer.losses import build_criterion
from fastmaskformer.ops.matching_cost import pack_targets


def _tiny_model_and_batch():
    cfg = fmf.get_config("ade20k-150-r50")
    m = cfg.model
    m.backbone.name, m.backbone.kwargs = "resnet18", {"channels": [8, 16, 32, 64]}
    m.num_classes, m.num_queries, m.hidden_dim, m.mask_dim, m.conv_dim = 5, 7, 16, 16, 32
    m.nheads, m.dim_feedforward, m.dec_layers = 2, 32, 2
    torch.manual_seed(0)
    model = fmf.build_model(m).eval()
    images = torch.randn(2, 3, 64, 96)
    g = torch.Generator().manual_seed(1)
    targets = [fmf.Target.from_semantic(torch.randint(0, 5, (64, 96), generator=g)),
               fmf.Target.from_semantic(torch.randint(0, 3, (50, 70), generator=g))]
    return cfg, model, images, targets


def test_model_forward_has_no_graph_break():
    _, model, images, _ = _tiny_model_and_batch()
    explained = torch._dynamo.explain(model)(images)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("per_prediction", [False, True])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_criterion_losses_have_no_graph_break(impl, per_prediction):
    """Also with per-prediction pixel features [L,B,C,h,w] (EoMT's)."""
    cfg, model, images, targets = _tiny_model_and_batch()
    cfg.loss.impl = impl
    criterion = build_criterion(cfg)
    out = model(images)
    if per_prediction:
        layers = out.mask_embed.shape[0]
        noise = torch.randn(layers, *out.pixel_embed.shape, generator=torch.Generator().manual_seed(2))
        out = type(out)(out.class_logits, out.mask_embed, out.pixel_embed + 0.1 * noise)
    eager = criterion(out, targets)  # loads the kernel modules outside compiled code, as training does
    packed = pack_targets(targets, images.shape[-2:], "cpu")
    num_masks = torch.tensor(float(sum(t.num_segments for t in targets)))
    explained = torch._dynamo.explain(criterion.losses)(out.class_logits, out.mask_embed, out.pixel_embed,
                                                        *packed, num_masks)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(criterion.losses, fullgraph=True)(out.class_logits, out.mask_embed,
                                                               out.pixel_embed, *packed, num_masks)
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    data_root = make_data(tmp_path / "syn", num_train=8, num_val=2)
    runs = {}
    for compile_ in (False, True):
        cfg = tiny_config(data_root, max_iter=3, checkpoint_period=0, compile=compile_)
        cfg.model.dropout = 0.0
        out = tmp_path / f"run_{compile_}"
        Trainer(cfg, out, device="cpu", deterministic=True, progress=False, log_period=1, num_workers=0).train()
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[compile_] = [l["total_loss"] for l in lines if "total_loss" in l]
    assert len(runs[True]) == len(runs[False]) == 3
    # Compiled kernels fuse and reorder fp32 reductions: losses agree to ~1e-4 relative.
    for a, b in zip(runs[True], runs[False]):
        assert a == pytest.approx(b, rel=2e-4)
