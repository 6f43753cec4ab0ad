"""Where fedrec keeps files, and atomic writes: every file it writes appears whole or not
at all."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that add one do not) that
    replaces `path` when the block succeeds and is removed when it fails. No fsync: a
    file torn by a power cut is caught by its reader's checks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib  # lazy: ~0.5 s to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def data_home(cache_dir: str = "") -> Path:
    """The cache of datasets, splits, embeddings and runs: cache_dir, else $FEDREC_HOME,
    else ~/.cache/fedrec."""
    base = cache_dir or os.environ.get("FEDREC_HOME") or "~/.cache/fedrec"
    return Path(base).expanduser()
