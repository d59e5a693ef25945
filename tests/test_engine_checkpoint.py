"""Atomic checkpoints, weights_only loading, clear errors for truncated or foreign files, RNG
state round trips, keep-last-N."""
import argparse
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fastmaskformer.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    previous_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)


def _state(value: float = 1.0):
    return {"model": {"w": torch.full((64, 64), value)}, "iteration": int(value), "rng": capture_rng_state()}


def test_roundtrip_weights_only(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, _state(3.0))
    raw = torch.load(path, weights_only=True)  # only tensors and primitive containers
    assert raw["iteration"] == 3
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    good = tmp_path / "model_0000001.pt"
    save_checkpoint(good, _state(1.0))
    truncated = tmp_path / "model_0000002.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model_0000002.pt.*truncated"):
        load_checkpoint(truncated)
    assert previous_checkpoint(truncated) == good
    assert load_checkpoint(good)["iteration"] == 1  # the previous one stays usable

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)

    foreign = tmp_path / "foreign.pt"  # arbitrary pickled objects are refused by weights_only
    torch.save({"model": {}, "obj": argparse.Namespace(a=1)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign.pt holds a Python object \(argparse.Namespace\)"):
        load_checkpoint(foreign)

    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt is not a fastmaskformer checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="missing.pt not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_kill_during_save_never_replaces_the_good_file(tmp_path):
    """SIGKILL a process that keeps overwriting one checkpoint (~4 MB each): whenever it dies,
    the file under the checkpoint name is a complete checkpoint."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, _state(0.0))
    script = textwrap.dedent(f"""
        import torch, sys
        from fastmaskformer.engine.checkpoint import save_checkpoint
        i = 0
        print("ready", flush=True)
        while True:
            i += 1
            save_checkpoint({str(path)!r}, {{"model": {{"w": torch.full((1024, 1024), float(i))}}, "iteration": i}})
    """)
    for delay in (0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)
        w = state["model"]["w"]
        assert torch.equal(w, torch.full_like(w, float(state["iteration"])))


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "r.pt", {"model": {}, "rng": capture_rng_state()})
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_manager_keeps_last_n_and_resolves_resume(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    assert resolve_resume("auto", tmp_path) is None
    for it in (2, 4, 6):
        manager.save(it, _state(float(it)))
    assert [p.name for p in manager.list()] == ["model_0000004.pt", "model_0000006.pt"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000006.pt"
    assert resolve_resume("auto", tmp_path) == tmp_path / "model_0000006.pt"
    assert resolve_resume(str(tmp_path), "elsewhere") == tmp_path / "model_0000006.pt"
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="nope.pt not found"):
        resolve_resume(tmp_path / "nope.pt", tmp_path)


def test_pickle_module_is_not_used_for_state():
    state = capture_rng_state()
    pickle.dumps(state)  # plain data
    assert isinstance(state["python"], list) and isinstance(state["numpy"][1], list)
