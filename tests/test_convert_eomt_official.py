"""The official EoMT release (tue-mps/eomt) -> our EoMT.

With the official code (``models/eomt.py``, run unchanged; a checkout named by
$FASTMASKFORMER_EOMT_OFFICIAL, skipped when unset): every prediction's class and mask logits equal
after converting its ``network.*`` state dict (random weights, non-trivial norms and layer
scales; masking on and off; eval and training), DINOv2 and DINOv3 (delta weights over a
transformers DINOv3ViTModel: the official code pins transformers 4.56.1, whose DINOv3ViTModel
has the ``layer`` its ``ViT`` renames; skipped on transformers 5). Without it: the key layout
round trip, the preset check and the errors."""
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

import fastmaskformer as fmf
from fastmaskformer.convert import convert_eomt_file, eomt_state_from_official, from_eomt_official
from test_eomt import TINY, nontrivial_

OFFICIAL_ENV = "FASTMASKFORMER_EOMT_OFFICIAL"


def tiny_config(num_blocks=2, num_queries=6, num_classes=5):
    cfg = fmf.get_config("eomt-coco-panoptic-dinov2-s-640")
    m = cfg.model
    m.backbone.kwargs, m.backbone.img_size = dict(TINY), 64
    m.num_blocks, m.num_queries, m.num_classes = num_blocks, num_queries, num_classes
    m.mask_annealing_start = m.mask_annealing_end = ()  # the preset's schedule is for 3 query blocks
    return cfg


def as_official_state(model) -> dict:
    """Our state dict in the official Lightning module's layout (the inverse renaming)."""
    renames = [("backbone.vit.", "network.encoder.backbone."), ("queries.", "network.q."),
               ("class_head.", "network.class_head."), ("mask_head.", "network.mask_head."),
               ("upscale.", "network.upscale.")]
    state = {"criterion.empty_weight": torch.ones(6), "network.attn_mask_probs": torch.ones(2)}
    for key, value in model.state_dict().items():
        for ours, official in renames:
            if key.startswith(ours):
                state[official + key[len(ours):]] = value
    return state


@pytest.fixture
def official_eomt(monkeypatch):
    """The official ``EoMT`` class and ``ViT`` module, imported from $FASTMASKFORMER_EOMT_OFFICIAL."""
    root = os.environ.get(OFFICIAL_ENV)
    if not root or not (Path(root) / "models" / "eomt.py").is_file():
        pytest.skip(f"set {OFFICIAL_ENV} to a checkout of tue-mps/eomt (models/eomt.py) to compare with it")
    monkeypatch.syspath_prepend(root)
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        monkeypatch.delitem(sys.modules, name)
    eomt, vit = importlib.import_module("models.eomt"), importlib.import_module("models.vit")
    yield eomt.EoMT, vit
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


def build_official(official_eomt, img_size=64, num_blocks=2, num_q=6, num_classes=5, **vit_kwargs):
    import timm

    EoMT, vit = official_eomt
    encoder = vit.ViT((img_size, img_size), backbone_name="vit_small_patch14_reg4_dinov2", ckpt_path="unused")
    if vit_kwargs:  # the same timm model the official ViT builds, at test size
        encoder.backbone = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
                                             img_size=(img_size, img_size), patch_size=16, num_classes=0, **vit_kwargs)
    torch.manual_seed(0)
    network = EoMT(encoder, num_classes=num_classes, num_q=num_q, num_blocks=num_blocks)
    return nontrivial_(network).eval()


def compare(official, ours, images, expect_layers):
    """Official forward on 0-1 images; ours on ``preprocess``; every prediction equal."""
    with torch.no_grad():
        ref_masks, ref_classes = official(images / 255.0)
        x, _ = ours.preprocess(list(images))
        out = ours(x)
    assert out.class_logits.shape[0] == expect_layers
    for layer in range(-expect_layers, 0):
        torch.testing.assert_close(out.class_logits[layer], ref_classes[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pred_masks(layer), ref_masks[layer], rtol=1e-4, atol=1e-4)


def test_every_prediction_equals_the_official_code(official_eomt, tmp_path):
    official = build_official(official_eomt, **TINY)
    ckpt = {"state_dict": {"network." + k: v for k, v in official.state_dict().items()}}
    ckpt["state_dict"]["criterion.empty_weight"] = torch.ones(6)
    torch.save(ckpt, tmp_path / "official.ckpt")
    ours = from_eomt_official(torch.load(tmp_path / "official.ckpt", weights_only=True), tiny_config())
    assert ours.mask_annealing.probs == [1.0, 1.0]
    images = torch.randint(0, 256, (2, 3, 64, 64)).float()
    compare(official, ours, images, 3)  # masked attention in both query blocks
    with torch.no_grad():
        official.attn_mask_probs.zero_()
    ours.mask_annealing.probs = [0.0, 0.0]
    compare(official, ours, images, 1)  # annealed, eval: only the final prediction (official: 3, equal)
    official.train(), ours.train()  # training: every prediction, masks all dropped
    compare(official, ours, images, 3)
    # the masks matter: with them on, the final prediction differs from the unmasked one
    with torch.no_grad():
        unmasked = ours.eval()(ours.preprocess(list(images))[0]).class_logits[-1]
        ours.mask_annealing.probs = [1.0, 1.0]
        masked = ours(ours.preprocess(list(images))[0]).class_logits[-1]
    assert not torch.allclose(unmasked, masked, atol=1e-3)


@pytest.mark.slow
def test_cli_converts_an_official_sized_checkpoint(official_eomt, tmp_path):
    """ViT-S 640, 200 queries, 3 query blocks, COCO panoptic: ``convert --from eomt FILE --preset``."""
    from fastmaskformer.cli import main

    official = build_official(official_eomt, img_size=640, num_blocks=3, num_q=200, num_classes=133)
    state = {"network." + k: v for k, v in official.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert main(["convert", "--from", "eomt", str(tmp_path / "pytorch_model.bin"), "--out", str(tmp_path / "ours.pt"),
                 "--preset", "eomt-coco-panoptic-dinov2-s-640"]) == 0
    ckpt = torch.load(tmp_path / "ours.pt", weights_only=True)
    ours = fmf.build_model(fmf.Config.from_dict(ckpt["config"]).model)
    ours.load_state_dict(ckpt["model"])
    compare(official, ours.eval(), torch.randint(0, 256, (1, 3, 640, 640)).float(), 4)


def test_dinov3_delta_weights_equal_the_official_code(official_eomt, tmp_path):
    """DINOv3: the official ``ViT`` around a transformers ``DINOv3ViTModel`` (a saved folder: the
    'pretrained' backbone), the network fine-tuned (random non-trivial weights), published as the
    delta the official loader adds back to a fresh network; converted with ``--backbone FOLDER``."""
    transformers = pytest.importorskip("transformers")
    from fastmaskformer.convert.eomt import load_dinov3_backbone

    EoMT, vit = official_eomt
    config = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                          intermediate_size=128, image_size=64, num_register_tokens=4)
    torch.manual_seed(1)
    nontrivial_(transformers.DINOv3ViTModel(config), seed=1).save_pretrained(tmp_path / "dinov3")
    if not hasattr(transformers.AutoModel.from_pretrained(tmp_path / "dinov3"), "layer"):
        pytest.skip(f"the official ViT needs DINOv3ViTModel.layer (transformers 4.x; it pins 4.56.1), "
                    f"transformers {transformers.__version__} has none")

    def network():
        encoder = vit.ViT((64, 64), backbone_name=str(tmp_path / "dinov3"))
        return EoMT(encoder, num_classes=5, num_q=6, num_blocks=2)

    initial = network()  # the official delta loader's start: the backbone, zeros elsewhere, initial buffers
    with torch.no_grad():
        for name, p in initial.named_parameters():
            if not name.startswith("encoder."):
                p.zero_()
    official = nontrivial_(network(), seed=2).eval()
    with torch.no_grad():  # fine-tuning moved every backbone weight
        for p in official.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    delta = {"network." + k: v - initial.state_dict()[k] for k, v in official.state_dict().items()}
    delta["criterion.empty_weight"] = torch.ones(6)
    cfg = fmf.get_config("eomt-coco-panoptic-dinov3-s-640-2x")
    m = cfg.model
    m.backbone.kwargs = dict(embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0)
    m.backbone.img_size, m.num_blocks, m.num_queries, m.num_classes = 64, 2, 6, 5
    m.mask_annealing_start = m.mask_annealing_end = ()
    ours = from_eomt_official(delta, cfg, *load_dinov3_backbone(tmp_path / "dinov3"))
    assert ours.mask_annealing.probs == [1.0, 1.0]
    images = torch.randint(0, 256, (2, 3, 64, 64)).float()
    compare(official, ours, images, 3)
    with torch.no_grad():
        official.attn_mask_probs.zero_()
    ours.mask_annealing.probs = [0.0, 0.0]
    compare(official, ours, images, 1)
    official.train(), ours.train()  # training: DINOv3's RoPE rescaling draws the same (global RNG, first draw)
    torch.manual_seed(5)
    with torch.no_grad():
        reference = official(images / 255.0)
    torch.manual_seed(5)
    with torch.no_grad():
        out = ours(ours.preprocess(list(images))[0])
    for layer in range(3):
        torch.testing.assert_close(out.class_logits[layer], reference[1][layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pred_masks(layer), reference[0][layer], rtol=1e-4, atol=1e-4)


def test_official_layout_round_trip_and_errors(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = nontrivial_(fmf.build_model(cfg.model)).eval()
    state = as_official_state(model)
    converted = from_eomt_official(state, cfg)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).class_logits, model(x).class_logits)
    assert set(eomt_state_from_official(state)) == set(model.state_dict())
    with pytest.raises(ValueError, match="mystery"):
        eomt_state_from_official({**state, "network.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no network.attn_mask_probs"):
        eomt_state_from_official({k: v for k, v in state.items() if k != "network.attn_mask_probs"})
    with pytest.raises(ValueError, match="DINOv3"):
        eomt_state_from_official({**state, "network.encoder.backbone.blocks.0.attention.q_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not eomt"):
        from_eomt_official(state, "mask2former-ade20k-150-r50")
    torch.save(state, tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match="does not fit preset 'eomt-coco-panoptic-dinov2-s-640'"):
        convert_eomt_file(tmp_path / "tiny.bin", tmp_path / "out.pt", "eomt-coco-panoptic-dinov2-s-640")


def test_cli_convert_from_eomt_needs_a_preset(tmp_path, capsys):
    from fastmaskformer.cli import main

    torch.save({}, tmp_path / "x.bin")
    assert main(["convert", "--from", "eomt", str(tmp_path / "x.bin"), "--out", str(tmp_path / "o.pt")]) != 0
    assert "needs --preset" in capsys.readouterr().err
