"""benchmarks/bench_train_step.py --arch mask2former: the transformers provider is the same
model as ours (same weights: ours is converted from it), its step runs HF's own loss, and the
CPU peak-memory measurement follows the live tensors."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
transformers = pytest.importorskip("transformers")


def _small_config():
    import bench_train_step as bench

    args = SimpleNamespace(preset="ade20k-150-r50", arch="mask2former", queries=6, classes=5, size=64)
    cfg = bench.config_for(args)
    m = cfg.model
    m.hidden_dim = m.conv_dim = m.mask_dim = 32
    m.nheads, m.dim_feedforward, m.dec_layers = 4, 64, 3
    m.pixel_decoder_kwargs = {"enc_layers": 1, "dim_feedforward": 64}
    cfg.loss.num_points = 256
    return bench, cfg


def test_transformers_twin_has_our_weights():
    bench, cfg = _small_config()
    ours, hf = bench.base_models(cfg)
    images, targets = bench.random_batch(2, 64, cfg.model.num_classes, 3, torch.device("cpu"))
    ours.eval(), hf.eval()
    with torch.no_grad():
        out = ours(images)
        ref = hf(pixel_values=images)
    torch.testing.assert_close(out.class_logits[-1], ref.class_queries_logits, rtol=1e-4, atol=1e-4)
    masks = torch.einsum("bqc,bchw->bqhw", out.mask_embed[-1], out.pixel_embed)
    torch.testing.assert_close(masks, ref.masks_queries_logits, rtol=1e-4, atol=1e-4)


def test_transformers_step_uses_its_loss():
    bench, cfg = _small_config()
    ours, hf = bench.base_models(cfg)
    device = torch.device("cpu")
    images, targets = bench.random_batch(2, 64, cfg.model.num_classes, 3, device)
    model, criterion, optimizer = bench.build(cfg, "transformers", device, hf)
    assert criterion is None and model is not hf
    before = [p.detach().clone() for p in model.parameters()]
    hf_loss = float(bench.make_hf_step(model, optimizer, images, targets, False, device)())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    model, criterion, optimizer = bench.build(cfg, "eager", device, ours)
    our_loss = float(bench.make_step(model, criterion, optimizer, images, targets, False, device)())
    # the same weights and formulas; only the random points differ (256 per mask here)
    assert abs(hf_loss - our_loss) / our_loss < 0.1, (hf_loss, our_loss)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_cpu_peak_memory_follows_live_tensors():
    code = (
        "import sys, torch; sys.path.insert(0, %r); import common; common.track_cpu_memory();"
        "x = common.measure(lambda: torch.ones(16 * 2**20).sum(), 'cpu', 1, 2);"
        "y = common.measure(lambda: torch.ones(2**10).sum(), 'cpu', 1, 2);"
        "print(x['peak_mem_mib'], y['peak_mem_mib'])" % str(BENCH))
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    big, small = map(float, out.stdout.split())
    assert 60 <= big <= 80, out.stdout  # the 64 MiB float32 tensor (and a little more)
    assert small < 8, out.stdout


def test_official_provider_is_skipped_without_a_checkout():
    import bench_train_step as bench

    assert "official" in bench.PROVIDERS
    reason = bench.available("official", torch.device("cpu"), object(), None)
    assert reason and "--official PATH" in reason
    assert bench.available("official", torch.device("cpu"), object(), "/some/checkout") is None


def test_official_provider_names_what_is_missing(tmp_path, capsys):
    """A path that is no checkout, then a checkout without detectron2 (not installable here):
    one-line errors from the argument parser, before any model is built."""
    import bench_train_step as bench

    with pytest.raises(SystemExit):
        bench.main(["--arch", "mask2former", "--official", str(tmp_path / "absent")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a facebookresearch/Mask2Former checkout" in err and "absent" in err
    (tmp_path / "mask2former").mkdir()
    (tmp_path / "mask2former" / "maskformer_model.py").write_text("")
    if bench.importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    with pytest.raises(SystemExit):
        bench.main(["--arch", "mask2former", "--official", str(tmp_path)])
    assert "needs detectron2" in capsys.readouterr().err.strip().splitlines()[-1]


OFFICIAL_ENV = "FASTMASKFORMER_MASK2FORMER_OFFICIAL"


def test_official_provider_has_our_weights_and_loss():
    """The official provider as it runs (a facebookresearch/Mask2Former checkout named by
    $FASTMASKFORMER_MASK2FORMER_OFFICIAL, with detectron2 and the checkout's compiled extension;
    skipped otherwise, as in CI): the official model holds our weights (every prediction's class
    and mask logits equal ours), its step trains, and its loss is ours up to the point noise."""
    import bench_train_step as bench

    root = os.environ.get(OFFICIAL_ENV)
    if not root:
        pytest.skip(f"set {OFFICIAL_ENV} to a facebookresearch/Mask2Former checkout to run the official provider")
    if problem := bench.official_problem(root):
        pytest.skip(problem)
    args = SimpleNamespace(preset="ade20k-150-r50", arch="mask2former", queries=8, classes=5, size=64)
    cfg = bench.config_for(args)
    m = cfg.model
    m.hidden_dim = m.conv_dim = m.mask_dim = 64
    m.nheads, m.dim_feedforward, m.dec_layers = 4, 128, 3
    m.pixel_decoder_kwargs = {"enc_layers": 1}  # the official encoder's FFN is 1024 wide, as our default
    cfg.loss.num_points = 4096
    ours, hf = bench.base_models(cfg)
    device = torch.device("cpu")
    images, targets = bench.random_batch(2, 64, m.num_classes, 3, device)
    model, criterion, optimizer = bench.build(cfg, "official", device, ours, root)
    diff = bench.official_output_diff(model, ours, images)
    assert diff["class_logits"] < 1e-4 and diff["mask_logits"] < 1e-4, diff
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    official_loss = float(bench.make_official_step(model, optimizer, images, targets, False, device)())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    model, criterion, optimizer = bench.build(cfg, "batched", device, ours)
    our_loss = float(bench.make_step(model, criterion, optimizer, images, targets, False, device)())
    assert abs(official_loss - our_loss) / our_loss < 0.05, (official_loss, our_loss)


@pytest.mark.parametrize("interleave", [True, False])
def test_providers_timed_interleaved_or_one_after_another(monkeypatch, interleave):
    """run(): every provider gets its step-0 loss and a timing, in rounds of one step each
    (--interleave, the CPU default) or one provider after the other."""
    bench, cfg = _small_config()
    monkeypatch.setattr(bench, "config_for", lambda args: cfg)
    timed = []

    def rounds(runs, device, rounds, warmup):  # time_providers with known results, in run order
        assert (rounds, warmup) == (2, 0)
        for fn in runs.values():
            fn()
        timed.extend(runs)
        return {name: {"median_ms": 100.0 * (i + 1), "p20_ms": 0.0, "p80_ms": 0.0} for i, name in enumerate(runs)}

    monkeypatch.setattr(bench, "time_providers", rounds)
    args = SimpleNamespace(device="cpu", providers=["eager", "batched"], amp="fp32", batch=1, size=64, segments=2,
                           warmup=0, repeats=2, interleave=interleave, official=None)
    rows = bench.run(args)
    assert [r["provider"] for r in rows] == ["eager", "batched"]
    assert timed == (["eager", "batched"] if interleave else [])
    for i, r in enumerate(rows):
        assert r["median_ms"] > 0 and r["images_per_s"] == pytest.approx(1e3 / r["median_ms"])
        assert r.get("interleaved", False) is interleave
        if interleave:  # each row has its own provider's timing
            assert r["median_ms"] == 100.0 * (i + 1)
    assert rows[0]["loss_step0"] == pytest.approx(rows[1]["loss_step0"], rel=1e-5)  # same weights and batch
