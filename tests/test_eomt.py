"""EoMT (modeling/eomt.py): the output contract, masked attention and mask annealing, its
generator in the state dict, the DINOv3 (RoPE) encoder, the presets and bad input. Parity with
transformers and the official code: test_convert_hf_eomt.py, test_convert_eomt_official.py."""
import pytest
import torch

import fastmaskformer as fmf
from fastmaskformer.config import BackboneConfig, Config, ModelConfig, list_presets
from fastmaskformer.modeling.eomt import MaskAnnealing

TINY = dict(depth=4, embed_dim=64, num_heads=2, mlp_ratio=4.0)


def nontrivial_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Layer scales of order 1 (DINOv2 initialises them at 1e-5: every block would be a no-op),
    random norm affines, register tokens and biases, so that every path changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("gamma", "lambda1", "gamma_1", "gamma_2")):
                p.copy_(0.5 + noise.abs())
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("bias", "reg_token", "register_tokens")):
                p.copy_(0.1 * noise)
    return model


def tiny_eomt(vit="dinov2_small", num_blocks=2, start=(), end=(), masked_attn=True, **model):
    cfg = ModelConfig(meta_arch="eomt", backbone=BackboneConfig(name=vit, img_size=64, kwargs=dict(TINY)),
                      num_classes=5, num_queries=6, num_blocks=num_blocks, mask_annealing_start=start,
                      mask_annealing_end=end, masked_attn=masked_attn, **model)
    torch.manual_seed(0)
    return nontrivial_(fmf.build_model(cfg))


def test_output_contract_training_and_inference():
    model = tiny_eomt(start=(0, 0), end=(10, 10))
    x = torch.randn(2, 3, 64, 96)
    out = model(x)  # training: every query block predicts before itself, plus the final prediction
    assert out.class_logits.shape == (3, 2, 6, 6) and out.mask_embed.shape == (3, 2, 6, 64)
    assert out.pixel_embed.shape == (3, 2, 64, 16, 24)  # one map per prediction, width C, 1/4 of the input
    torch.testing.assert_close(out.pred_masks(1), torch.einsum("bqc,bchw->bqhw", out.mask_embed[1], out.pixel_embed[1]))
    model.eval()
    model.mask_annealing.set_step(10)  # annealed: no mask, no intermediate prediction
    calls = []
    model.upscale.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(x)
    assert out.class_logits.shape[0] == out.mask_embed.shape[0] == out.pixel_embed.shape[0] == 1
    assert len(calls) == 1
    model.train()
    assert model(x).class_logits.shape[0] == 3  # training keeps deep supervision after annealing (official)


def test_masking_off_predicts_once_and_masks_nothing():
    masked, plain = tiny_eomt(), tiny_eomt(masked_attn=False)
    plain.load_state_dict(masked.state_dict(), strict=False)
    plain.mask_annealing.probs = [0.0, 0.0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = masked.eval()(x), plain.eval()(x)
    assert a.class_logits.shape[0] == 3 and b.class_logits.shape[0] == 1
    assert not torch.allclose(a.class_logits[-1], b.class_logits[-1], atol=1e-3)  # the masks changed the result
    masked.mask_annealing.probs = [0.0, 0.0]
    with torch.no_grad():
        torch.testing.assert_close(masked(x).class_logits, b.class_logits)


def test_annealing_schedule_is_the_official_polynomial():
    annealing = MaskAnnealing(2, start_steps=(10, 20), end_steps=(20, 40), power=0.9)
    expected = {0: [1, 1], 10: [1, 1], 15: [0.5 ** 0.9, 1], 20: [0, 1], 30: [0, 0.5 ** 0.9], 40: [0, 0], 99: [0, 0]}
    for step, probs in expected.items():
        annealing.set_step(step)
        assert annealing.probs == pytest.approx(probs), step
    assert MaskAnnealing(3).probs == [1.0] * 3 and MaskAnnealing(3, masked_attn=False).probs == [0.0] * 3


def test_dropped_queries_attend_everywhere():
    model = tiny_eomt()
    b, q, grid = 2, 6, (4, 4)
    mask_embed, pixel_embed = torch.randn(b, q, 64), torch.randn(b, 64, 16, 16)
    keep = torch.nn.functional.interpolate(
        torch.einsum("bqc,bchw->bqhw", mask_embed, pixel_embed), size=grid, mode="bilinear").flatten(2) > 0
    full = model._attention_mask(mask_embed, pixel_embed, grid, 0)[:, 0]  # probability 1: every query masked
    prefix = q + model.backbone.num_prefix_tokens
    assert full.shape == (b, prefix + 16, prefix + 16)
    assert torch.equal(full[:, :q, prefix:], keep) and full[:, q:].all() and full[:, :, :prefix].all()
    model.mask_annealing.probs = [0.5, 1.0]
    g = torch.Generator().manual_seed(model.mask_annealing.seed)
    dropped = torch.rand(b, q, generator=g) > 0.5
    half = model._attention_mask(mask_embed, pixel_embed, grid, 0)[:, 0]
    assert dropped.any() and (~dropped).any()
    assert half[:, :q, prefix:][dropped].all()
    assert torch.equal(half[:, :q, prefix:][~dropped], keep[~dropped])
    model.mask_annealing.probs = [0.0, 1.0]
    assert model._attention_mask(mask_embed, pixel_embed, grid, 0) is None


def test_mask_dropping_generator_resumes_from_the_state_dict():
    model = tiny_eomt(start=(0, 0), end=(4, 4))
    model.mask_annealing.set_step(2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)  # advance the generator
        saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
        first = model(x).class_logits
        second = model(x).class_logits
        assert not torch.equal(first[1:], second[1:])  # fresh draws each step
        resumed = tiny_eomt(start=(0, 0), end=(4, 4))
        resumed.load_state_dict(saved)
        assert resumed.mask_annealing.probs == model.mask_annealing.probs
        torch.testing.assert_close(resumed(x).class_logits, first)
        state = resumed.mask_annealing.get_extra_state()["generator"].clone()
        resumed.eval()(x)  # evaluating does not move the training stream
        assert torch.equal(resumed.mask_annealing.get_extra_state()["generator"], state)
        torch.testing.assert_close(resumed.train()(x).class_logits, second)


@pytest.mark.parametrize("vit", ["dinov2_small", "dinov3_small"])
def test_queries_are_permutation_equivariant(vit):
    """Queries carry no position: permuting them permutes every output. With RoPE (DINOv3) this
    fails unless the rotation skips the prepended queries and reaches exactly the patches."""
    model = tiny_eomt(vit).eval()
    model.mask_annealing.probs = [1.0, 1.0]
    x = torch.randn(1, 3, 64, 80)
    perm = torch.randperm(6)
    with torch.no_grad():
        ref = model(x)
        model.queries.weight.copy_(model.queries.weight[perm])
        out = model(x)
    torch.testing.assert_close(out.class_logits, ref.class_logits[:, :, perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.mask_embed, ref.mask_embed[:, :, perm], rtol=1e-4, atol=1e-5)
    if vit.startswith("dinov3"):
        assert model.backbone.uses_rope
        assert [blk.attn.num_prefix_tokens for blk in model.backbone.blocks] == [5, 5, 11, 11]


def test_dinov3_rope_reaches_the_patches():
    """Moving the image moves the answer: the RoPE table is applied (a model that ignored it
    would be permutation-invariant over patches)."""
    model = tiny_eomt("dinov3_small").eval()
    x = torch.randn(1, 3, 64, 64)
    shuffled = x.unfold(2, 16, 16).unfold(3, 16, 16).flip(2).permute(0, 1, 2, 4, 3, 5).reshape(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x).class_logits, model(shuffled).class_logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_bad_input_is_reported():
    model = tiny_eomt()
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match="num_blocks must be in"):
        tiny_eomt(num_blocks=5)
    with pytest.raises(ValueError, match="one start and one end step per query block"):
        tiny_eomt(start=(1,), end=(2,))
    with pytest.raises(ValueError, match="must not precede"):
        tiny_eomt(start=(5, 5), end=(4, 6))
    with pytest.raises(ValueError, match="unknown ViT"):
        tiny_eomt(vit="resnet50")


OFFICIAL = {  # preset: (ViT, query blocks, queries, classes, input, lr, annealing starts, ends, iterations)
    "eomt-coco-panoptic-dinov2-l-640": ("dinov2_large", 4, 200, 133, 640, 1e-4, (14782, 29564, 44346, 59128),
                                        (29564, 44346, 59128, 73910), 12 * 7391),
    "eomt-coco-panoptic-dinov2-s-640-2x": ("dinov2_small", 3, 200, 133, 640, 1e-4, (29564, 73910, 118256),
                                           (59128, 103474, 147820), 24 * 7391),
    "eomt-coco-panoptic-dinov2-g-1280": ("dinov2_giant", 5, 200, 133, 1280, 1e-4,
                                         (14782, 25869, 36955, 48042, 59128), (29564, 40651, 51737, 62824, 73910),
                                         12 * 7391),
    "eomt-ade20k-150-dinov2-l-512": ("dinov2_large", 4, 100, 150, 512, 1e-4, (6520, 13040, 19560, 26080),
                                     (13040, 19560, 26080, 32600), 31 * 1264),
    "eomt-cityscapes-dinov2-l-1024": ("dinov2_large", 4, 100, 19, 1024, 1e-4, (3317, 6634, 9951, 13268),
                                      (6634, 9951, 13268, 16585), 107 * 186),
    "eomt-coco-panoptic-dinov3-l-640": ("dinov3_large", 4, 200, 133, 640, 2e-4, (0, 29564, 44346, 59128),
                                        (3000, 44346, 59128, 73910), 12 * 7391),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_presets_match_the_official_configs(name):
    cfg = fmf.get_config(name)
    vit, blocks, queries, classes, size, lr, start, end, iters = OFFICIAL[name]
    m, s, loss = cfg.model, cfg.solver, cfg.loss
    assert (m.meta_arch, m.backbone.name, m.num_blocks, m.num_queries, m.num_classes) == ("eomt", vit, blocks, queries,
                                                                                           classes)
    assert (m.backbone.img_size, cfg.data.crop_size, m.patch_size) == (size, (size, size), 16)
    assert (m.mask_annealing_start, m.mask_annealing_end, m.mask_annealing_power) == (start, end, 0.9)
    assert (s.lr, s.weight_decay, s.clip_grad_norm, s.batch_size, s.max_iter, s.poly_power) == (lr, 0.05, 0.01, 16,
                                                                                                iters, 0.9)
    assert (loss.class_weight, loss.mask_weight, loss.dice_weight, loss.no_object_weight, loss.num_points) == (
        2.0, 5.0, 5.0, 0.1, 12544)
    assert Config.from_yaml(cfg.to_yaml()).to_dict() == cfg.to_dict()


def test_every_eomt_preset_builds_a_model():
    names = [n for n in list_presets() if n.startswith("eomt-")]
    assert len(names) == 24 and "eomt-ade20k-full-847-dinov2-l-512" in names
    for name in names:
        cfg = fmf.get_config(name)
        cfg.model.backbone.kwargs = dict(TINY, depth=6)  # the real widths would take minutes on 2 cores
        cfg.model.backbone.img_size = 64
        model = fmf.build_model(cfg.model)
        assert len(model.mask_annealing.probs) == cfg.model.num_blocks, name
        assert model.class_head.out_features == cfg.model.num_classes + 1



def test_trainer_anneals_per_iteration_and_resumes_the_mask_generator(tmp_path, monkeypatch):
    """The trainer sets the probabilities of each iteration before its forward and checkpoints
    the generator: a resumed run drops the same masks as the uninterrupted one."""
    from fastmaskformer.engine.trainer import Trainer

    cfg = Config(model=ModelConfig(meta_arch="eomt", backbone=BackboneConfig(name="dinov2_small", img_size=64,
                                                                         kwargs=dict(TINY)),
                                   num_classes=5, num_queries=6, num_blocks=2, mask_annealing_start=(0, 1),
                                   mask_annealing_end=(2, 4)))
    cfg.solver.eval_period, cfg.solver.batch_size, cfg.solver.max_iter = 0, 2, 10
    seen = []

    def forward_only(trainer, batch, sync):  # the criterion's per-prediction features are another branch
        with torch.no_grad():
            seen.append((list(trainer.mask_annealing.probs), trainer.model(torch.ones(2, 3, 64, 64)).class_logits))
        return {"total_loss": 0.0}

    monkeypatch.setattr(Trainer, "_micro_step", forward_only)
    trainer = Trainer(cfg, tmp_path, device="cpu", train_dataset=[None] * 8, progress=False)
    nontrivial_(trainer.model)  # layer scales of order 1: the masks change the outputs
    for _ in range(3):
        trainer.run_step(iter([{}]))
    assert [p for p, _ in seen] == [[1.0, 1.0], [0.5 ** 0.9, 1.0], [0.0, (1 - 1 / 3) ** 0.9]]
    path = trainer.save()
    trainer.run_step(iter([{}]))
    expected = seen[-1][1]
    resumed = Trainer(cfg, tmp_path, device="cpu", train_dataset=[None] * 8, progress=False, resume=path)
    assert resumed.iteration == 3
    resumed.run_step(iter([{}]))
    assert seen[-1][0] == [0.0, (1 - 2 / 3) ** 0.9]
    torch.testing.assert_close(seen[-1][1], expected, rtol=0, atol=0)
