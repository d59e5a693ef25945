"""Run folders: a checkpoint that cannot be written (full disk, read-only or vanished folder) is
one line saying which file, about how much space it needs and that the previous checkpoint is
intact; a new run (train, demo) never mixes into a folder holding another run."""
import errno
import os
import shutil

import pytest
import torch

from engine_tiny import make_data, write_tiny_yaml
from fastmaskformer.cli import main
from fastmaskformer.engine import checkpoint as ckpt_module
from fastmaskformer.engine.checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    RunFolderError,
    claim_run_folder,
    load_checkpoint,
)


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((256, 1024), value)}, "iteration": int(value)}  # 1 MB


def _full_disk(monkeypatch, error):
    """torch.save writes some bytes, then fails with ``error``."""
    def failing_save(obj, f):
        f.write(b"x" * 1000)
        raise error

    monkeypatch.setattr(ckpt_module.torch, "save", failing_save)


def _assert_previous_intact(folder):
    assert (folder / "last_checkpoint").read_text() == "model_0000001.pt"
    assert load_checkpoint(folder / "model_0000001.pt")["iteration"] == 1
    assert not (folder / "model_0000002.pt").exists() and not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 990"),  # torch's words
], ids=["ENOSPC", "torch-zip-writer"])
def test_full_disk(tmp_path, monkeypatch, error):
    manager = CheckpointManager(tmp_path)
    manager.save(1, _state(1.0))
    _full_disk(monkeypatch, error)
    if isinstance(error, RuntimeError):  # the zip writer's error says nothing: the free space tells
        monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(2, _state(2.0))
    message = str(info.value)
    assert "\n" not in message
    assert f"could not write checkpoint {tmp_path / 'model_0000002.pt'}: the disk is full (it needs about 1 MB" \
        in message
    assert f"the previous checkpoint {tmp_path / 'model_0000001.pt'} and last_checkpoint are intact" in message
    assert "--resume continues from it" in message
    _assert_previous_intact(tmp_path)


def test_read_only_folder(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(1, _state(1.0))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ckpt_module.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointWriteError, match=f"the output folder {tmp_path} is read-only .*"
                                                   "previous checkpoint .*model_0000001.pt"):
        manager.save(2, _state(2.0))
    _assert_previous_intact(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, _state(1.0))
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match="is read-only"):
            manager.save(2, _state(2.0))
    finally:
        tmp_path.chmod(0o755)
    _assert_previous_intact(tmp_path)


def test_vanished_folder(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    (tmp_path / "run").mkdir()
    shutil.rmtree(tmp_path / "run")  # removed (or unmounted) during the run: not silently recreated
    with pytest.raises(CheckpointWriteError, match="the output folder .*run no longer exists"):
        manager.save(2, _state(2.0))
    assert not (tmp_path / "run").exists()


def test_train_full_disk_then_resume(tmp_path, monkeypatch, capsys):
    """The CLI: one line (no serializer traceback), exit 2; --resume then finishes the run."""
    data = make_data(tmp_path / "data", num_train=4, num_val=1)
    cfg = write_tiny_yaml(tmp_path / "t.yaml", max_iter=4, checkpoint_period=2)
    args = ["train", "--config", str(cfg), "--data-root", str(data), "--output", str(tmp_path / "run"),
            "--no-progress"]
    real_save = ckpt_module.torch.save
    calls = []

    def second_fails(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 990")
        return real_save(obj, f)

    monkeypatch.setattr(ckpt_module.torch, "save", second_fails)
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "model_0000004.pt: the disk is full (it needs about" in err and "model_0000002.pt" in err
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("model_*.pt")) == ["model_0000002.pt", "model_0000004.pt"]

    # a new run into that folder is refused (not mixed into its metrics and checkpoints) ...
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a previous run (model_0000002.pt" in err
    assert "pass --resume to continue it, another --output, or --force to replace it" in err
    # ... unless --force replaces it
    assert main(args + ["--force", "--set", "solver.max_iter=2"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("model_*.pt")) == ["model_0000002.pt"]
    assert [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]


def test_claim_run_folder(tmp_path):
    claim_run_folder(tmp_path / "missing", False, "x")  # nothing there: fine
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")  # not a run file
    claim_run_folder(tmp_path / "run", False, "x")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "run" / "tensorboard").mkdir()
    with pytest.raises(RunFolderError, match="holds a previous run .metrics.jsonl, tensorboard.; pass another "
                                             "--output or --force to replace it"):
        claim_run_folder(tmp_path / "run", False, "pass another --output")
    claim_run_folder(tmp_path / "run", True, "pass another --output")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_demo_folder_per_architecture(tmp_path, monkeypatch, capsys):
    """demo and demo --arch mask2former default to their own folders; a folder holding a demo
    run is refused in one line naming --output and --force before anything is generated."""
    from fastmaskformer.engine import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.append((str(out), kw["arch"], kw["force"])))
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0 and main(["demo", "--arch", "mask2former", "--force"]) == 0
    assert seen == [(os.path.join("demo_output", "maskformer"), "maskformer", False),
                    (os.path.join("demo_output", "mask2former"), "mask2former", True)]
    monkeypatch.undo()
    (tmp_path / "d" / "run").mkdir(parents=True)
    (tmp_path / "d" / "run" / "model_0000060.pt").write_bytes(b"")
    assert main(["demo", "--quick", "--no-progress", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "holds a previous run (model_0000060.pt); pass another --output or --force to replace it" in err[-1]
    assert not (tmp_path / "d" / "data").exists()
