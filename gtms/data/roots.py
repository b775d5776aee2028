"""Where a run's prepared dataset is, generating SynthRef on the way when it is absent."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from gtms import storage
from gtms.config import Config
from gtms.errors import UserError


class DataRootError(UserError):
    """The config's dataset is not prepared, or a SynthRef folder holds other settings."""


def prepare_data_root(cfg: Config) -> str:
    """The prepared dataset's folder (``<root>/shards/<split>``), absolute.

    May generate: SynthRef is generated and sharded here when absent (with progress output);
    another dataset must have been prepared with ``run.py prepare``.
    """
    root = cfg.data.root
    if storage.is_uri(root):
        return root
    root = os.path.abspath(root)  # not resolved: printed commands name the folder as given
    if cfg.data.dataset == "synthref":
        from gtms.data.shards import read_manifest, shards_dir
        from gtms.data.synthref import ensure_synthref

        wanted = {"num_images": cfg.data.synthref_images, "seed": cfg.data.synthref_seed,
                  "difficulty": cfg.data.synthref_difficulty}
        manifest = read_manifest(shards_dir(root)) or {}
        have = manifest.get("generator")
        if manifest.get("complete") and have and \
                {k: have.get(k) for k in wanted} != wanted:
            raise DataRootError(
                f"{root} holds SynthRef generated with {have}, but the config asks for {wanted}"
                "; set data.synthref_images / synthref_seed / synthref_difficulty to match, or "
                "point data.root elsewhere (nothing is overwritten)")
        ensure_synthref(root, **wanted)
    elif not (Path(root) / "shards" / "manifest.json").is_file():
        command = shlex.join(["python", "run.py", "prepare", "--dataset", cfg.data.dataset,
                              "--refer-root", "DIR", "--images", "DIR", "--out", cfg.data.root])
        raise DataRootError(f"no prepared {cfg.data.dataset} dataset at {root} (manifest.json "
                            f"missing); run: {command}")
    return root
