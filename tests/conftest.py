"""Shared fixtures: a small SynthRef dataset and one local Ray cluster for the integration tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

SMALL_IMAGES = 24
SMALL_SEED = 5
ARTIFACTS: list[tuple[str, Path]] = []   # files tests wrote for people to look at


@pytest.fixture
def artifact():
    """``artifact(path, what)``: list a file a test wrote for people to look at (a screenshot)
    in pytest's summary, whether the test passes or fails."""
    def register(path: Path, what: str) -> Path:
        ARTIFACTS.append((what, Path(path)))
        return Path(path)

    return register


def pytest_terminal_summary(terminalreporter):
    if ARTIFACTS:
        terminalreporter.section("files to look at")
        for what, path in ARTIFACTS:
            terminalreporter.write_line(f"{what}: {path}")


def pytest_collection_modifyitems(config, items):
    """Tiers by fixture: a test that uses ``ray_cluster`` is an integration test, marker or not."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _fast_tier_never_starts_ray(request, monkeypatch):
    """In the fast tier (no ``integration`` marker) starting Ray is an error that names the fix;
    a test that needs Ray uses the ``ray_cluster`` fixture or the marker."""
    if request.node.get_closest_marker("integration") is not None:
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts Ray but is not an integration test: "
                           "use the ray_cluster fixture or @pytest.mark.integration")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def synthref_small(tmp_path_factory) -> Path:
    """A small SynthRef (24 images: ~80 refs) prepared once per test session; returns its root."""
    from gtms.data.synthref import SynthRefSettings, prepare_synthref

    root = tmp_path_factory.mktemp("synthref_small")
    prepare_synthref(root, SynthRefSettings(num_images=SMALL_IMAGES, seed=SMALL_SEED),
                     progress=False, rows_per_file=32, rows_per_row_group=8)
    return root


@pytest.fixture(scope="session")
def small_data(synthref_small) -> list[str]:
    """Config overrides that name the small SynthRef exactly (so nothing is regenerated)."""
    return [f"data.root={synthref_small}", f"data.synthref_images={SMALL_IMAGES}",
            f"data.synthref_seed={SMALL_SEED}"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every integration test, sized by the project's own resource plan."""
    import ray

    from gtms.config import RayConfig
    from gtms.runtime import init_ray

    started = not ray.is_initialized()
    init_ray(RayConfig(num_workers=2, preprocess_actors=1))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def synthref_bad(synthref_small, tmp_path_factory) -> Path:
    """A copy of the small SynthRef with known bad rows (same manifest, same file names).

    ``train/part-00000.parquet``: row 0 has an undecodable image, row 1 only sentences that are
    empty after cleaning (2 of them), row 2 one extra empty sentence; ``val/part-00000``: row 0
    has an undecodable image. Returns its root.
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("synthref_bad")
    shutil.copytree(synthref_small / "shards", root / "shards")
    edits = {"train": {"image": {0: b"not an image"},
                       "sentences": {1: ["   ", "&nbsp;"], 2: None}},
             "val": {"image": {0: b"not an image"}}}
    for split, columns in edits.items():
        path = root / "shards" / split / "part-00000.parquet"
        table = pq.read_table(path)
        for name, rows in columns.items():
            values = table.column(name).to_pylist()
            for i, value in rows.items():
                values[i] = value if value is not None else [" "] + values[i]
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, pa.array(values, table.schema.field(name).type))
        pq.write_table(table, path, row_group_size=8)
    _rerecord_in_manifest(root / "shards", [f"{split}/part-00000.parquet" for split in edits])
    return root


def _rerecord_in_manifest(shard_dir: Path, names: list[str]) -> None:
    """Record the new size and sha256 of hand-edited shard files, so that ``verify_shards``
    accepts them (it refuses any file that differs from what ``prepare`` wrote)."""
    import json

    from gtms.data.refer import file_sha256
    from gtms.data.shards import MANIFEST_NAME

    manifest_path = shard_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        if entry["path"] in names:
            path = shard_dir / entry["path"]
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = file_sha256(path)
    manifest_path.write_text(json.dumps(manifest, indent=1))
