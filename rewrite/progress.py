"""A progress bar for long work: tqdm on stderr, or a silent stand-in when it is off."""
from __future__ import annotations

import sys


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool):
    """A tqdm bar (a context manager) of `total` steps on stderr when enabled, else a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="step", leave=False, dynamic_ncols=True)
