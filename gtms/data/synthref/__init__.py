"""SynthRef: the project's own synthetic referring-segmentation dataset (refer layout).

``ensure_synthref(out_dir, num_images=..., seed=..., difficulty=...)`` returns the shards folder,
generating and sharding first if needed; ``python run.py prepare --dataset synthref`` does the
same from the command line. Modules: ``shapes`` (masks and polygons), ``scene`` (layout and
rendering), ``expressions`` (grammar, semantics, verifier), ``generate`` (files on disk).
"""

from gtms.data.synthref.generate import (
    DEFAULT_DIFFICULTY,
    DEFAULT_DIR,
    DEFAULT_NUM_IMAGES,
    DEFAULT_SEED,
    SynthRefSettings,
    ensure_synthref,
    generate_synthref,
    prepare_synthref,
    refer_source,
)

__all__ = [
    "DEFAULT_DIFFICULTY",
    "DEFAULT_DIR",
    "DEFAULT_NUM_IMAGES",
    "DEFAULT_SEED",
    "SynthRefSettings",
    "ensure_synthref",
    "generate_synthref",
    "prepare_synthref",
    "refer_source",
]
