"""Training curves from ``metrics.jsonl`` (written by the Trainer): loss terms, learning rate
and evaluation metrics (mIoU, PQ) against the iteration, as one PNG (matplotlib, Agg).

matplotlib is a dependency of the package; where it cannot be imported anyway, plotting raises
``PlottingUnavailable`` (one line, with the fix) after the input has been read and checked."""
from __future__ import annotations

import json
from pathlib import Path

# final-layer terms plotted beside the total (auxiliary layers' terms carry a _<i> suffix)
_LOSS_TERMS = ("loss_ce", "loss_mask", "loss_dice", "loss_sem_seg")
_EVAL_KEYS = ("sem_seg/mIoU", "panoptic/PQ")


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a metrics.jsonl file; a resumed run may log an
    iteration twice: the later line wins."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} not found")
    train, evals = {}, {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
            (evals if "eval" in record else train)[record["iter"]] = record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


class PlottingUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message says how to install it."""


def _pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlottingUnavailable(f"plotting needs matplotlib, which cannot be imported ({exc}); "
                                  f"install it with: pip install matplotlib") from exc
    return plt


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Write loss / LR / metric curves of ``metrics_path`` to ``out_path`` (PNG); returns it.
    Raises FileNotFoundError / ValueError for a missing or bad metrics file, then
    PlottingUnavailable without matplotlib."""
    train, evals = read_metrics(metrics_path)
    train = [r for r in train if "total_loss" in r]  # skipped (non-finite) iterations log no losses
    if not train and not evals:
        raise ValueError(f"{metrics_path} holds no records")
    plt = _pyplot()
    eval_keys = [k for k in _EVAL_KEYS if any(k in e["eval"] for e in evals)]
    panels = 2 + (1 if eval_keys else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    iters = [r["iter"] for r in train]
    ax = axes[0]
    if train:
        ax.plot(iters, [r["total_loss"] for r in train], label="total (weighted)", color="black")
        for term in _LOSS_TERMS:
            if term in train[0]:
                ax.plot(iters, [r[term] for r in train], label=term, alpha=0.8)
        ax.set_yscale("log")
    ax.set_title("training loss")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
    ax = axes[1]
    if train:
        ax.plot(iters, [r["lr"] for r in train], color="tab:green")
    ax.set_title("learning rate")
    ax.set_xlabel("iteration")
    if eval_keys:
        ax = axes[2]
        for key in eval_keys:
            points = [(e["iter"], e["eval"][key]) for e in evals if key in e["eval"]]
            ax.plot(*zip(*points), marker="o", label=key.split("/")[-1])
        ax.set_title("validation (%)")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
