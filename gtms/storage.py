"""Run storage on a local folder or any URI pyarrow understands (``s3://``, ``gs://``, ``file://``).

Ray Train writes checkpoints to the storage path itself. Our own run files (config, metrics,
TensorBoard events, summary) are written to a local mirror and copied to the storage after each
change, so TensorBoard and ``tail -f`` work on either side.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def is_uri(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute (workers change directory); URIs unchanged."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_uri(base) else \
        str(Path(base, *parts))


def sibling(path: str, name: str) -> str:
    """The file ``name`` in the folder of ``path`` (local or URI)."""
    path = str(path)
    return f"{path.rsplit('/', 1)[0]}/{name}" if is_uri(path) else str(Path(path).parent / name)


def _fs(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def exists(path: str) -> bool:
    if not is_uri(path):
        return Path(path).exists()
    from pyarrow import fs

    filesystem, inner = _fs(path)
    return filesystem.get_file_info(inner).type != fs.FileType.NotFound


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    filesystem, inner = _fs(path)
    with filesystem.open_input_stream(inner) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write the file ``path`` (local or URI), making its folder."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return
    filesystem, inner = _fs(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as f:
        f.write(data)


def upload_dir(local: Path, remote: str) -> None:
    """Copy the files of ``local`` into ``remote`` (overwriting)."""
    from pyarrow import fs

    filesystem, inner = _fs(remote)
    filesystem.create_dir(inner, recursive=True)
    fs.copy_files(str(local), inner, destination_filesystem=filesystem)


def download_dir(remote: str, local: Path) -> None:
    """Copy ``remote`` (if it exists) into the local folder ``local``."""
    from pyarrow import fs

    if not exists(remote):
        return
    filesystem, inner = _fs(remote)
    local.mkdir(parents=True, exist_ok=True)
    fs.copy_files(inner, str(local), source_filesystem=filesystem)


def remove_dir(path: str) -> None:
    """Delete the folder ``path`` (local or URI) with everything in it."""
    if not is_uri(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    filesystem, inner = _fs(path)
    filesystem.delete_dir(inner)


class RunFolder:
    """Where a run's own files go: ``path`` locally; synced to ``remote`` when storage is a URI."""

    def __init__(self, run_dir: str, *, fetch: bool = False):
        self.remote = run_dir if is_uri(run_dir) else None
        if self.remote:
            self.path = Path(tempfile.mkdtemp(prefix="gtms-run-"))
            if fetch:
                for name in ("metrics.jsonl", "config.yaml", "run.json", "tracking.json",
                             "summary.json"):
                    remote = join(self.remote, name)
                    if exists(remote):
                        (self.path / name).write_text(read_text(remote))
        else:
            self.path = Path(run_dir)
            self.path.mkdir(parents=True, exist_ok=True)

    def sync(self) -> None:
        if self.remote:
            upload_dir(self.path, self.remote)


@contextmanager
def folder_lock(folder: Path, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on ``folder/name`` (created with the folder): concurrent builders of
    one cache (SynthRef, SynthCLIP) on a machine wait for each other instead of racing."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
