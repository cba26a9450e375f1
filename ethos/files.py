"""Writing files so that a reader never sees half of one: the one atomic write every writer in ethos uses."""

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path beside `path` to write to; on success it is renamed over `path` (os.replace is atomic
    within a file system), on error removed. The temp name is per process: the ranks of one job, or the jobs of
    a sweep, may write the same file at once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
