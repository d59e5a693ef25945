"""``data.on_bad_sample: skip``: train past unreadable samples, deterministically.

:class:`SkipBadSamples` wraps a training dataset. When item ``(index, seed)`` cannot be loaded
(a ``DatasetError``: corrupt or truncated image, bad label map, size mismatch ...) it serves the
next readable index ``index + 1, index + 2, ...`` (mod the dataset size) with the *same* seed,
so the replacement depends only on the sample stream and on which files are bad: a resumed run
draws exactly what an uninterrupted one draws. The item carries ``"bad_samples"``: the
``(path or index, reason)`` of every sample it replaced, which ``collate`` gathers per batch
and the trainer logs once per file, counts in ``metrics.jsonl`` and checks against
``data.max_bad_fraction``.
"""
from __future__ import annotations

import re

from torch.utils.data import Dataset

from .errors import DatasetError

ON_BAD_SAMPLE = ("error", "skip")


def _name(dataset, index: int) -> str:
    """The file behind item ``index`` when the dataset says (pairs / records), else ``#index``."""
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None:
        return str(pairs[index][0])
    records = getattr(dataset, "records", None)
    if records is not None:
        return str(records[index]["image"])
    return f"#{index}"


def _culprit(message: str, fallback: str) -> str:
    """The path a DatasetError names (its first absolute path), else ``fallback``."""
    m = re.search(r"(/[^\s:;,'\"]+)", message)
    return m.group(1) if m else fallback


class SkipBadSamples(Dataset):
    """``dataset`` with unreadable items replaced (see the module docstring)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # metadata, pairs, set_epoch ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), key[1]
            make = lambda i: (i, seed)  # noqa: E731
        else:
            index, make = int(key), (lambda i: i)
        n = len(self.dataset)
        bad = []
        for step in range(n):
            i = (index + step) % n
            try:
                item = self.dataset[make(i)]
            except DatasetError as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                bad.append((_culprit(message, _name(self.dataset, i)), message))
                continue
            item["bad_samples"] = bad
            return item
        raise DatasetError(f"no readable training sample: all {n} failed (first: {bad[0][1]})")
