"""Shared fixtures: a small SynthRef dataset and one local Ray cluster for the integration tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

SMALL_IMAGES = 24
SMALL_SEED = 5


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
