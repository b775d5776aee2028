"""What a training run will do, settled before its folder is made: the refs and optimizer steps
of an epoch, the samples the pipeline makes for training and validation, and which
preprocessed splits fit in memory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gtms.backend import Backend
from gtms.config import Config
from gtms.console import phase, say
from gtms.data.pipeline import SampleSpec, fits_in_memory, preprocessed_nbytes, spec_for, split_size
from gtms.data.reading import count_rows, without_single_samples
from gtms.train.run_folder import RunError, RunPaths


@dataclass(frozen=True)
class TrainingPlan:
    """What :func:`gtms.train.fit.fit` settles before the run folder is made."""

    cfg: Config
    paths: RunPaths
    root: str          # the data root, its shards checked
    n_train: int       # training refs per epoch
    world: int         # training processes: 1 without Ray, else ray.num_workers
    steps: int         # optimizer steps per epoch (see steps_per_epoch)
    uses_ray: bool


def plan_training(cfg: Config, paths: RunPaths, root: str, backend: Backend) -> TrainingPlan:
    """Count the training refs, the workers and the optimizer steps of an epoch."""
    n_train = _limited(count_rows(root, cfg.data.train_split), cfg.data.limit_train_refs)
    if n_train == 0:
        raise RunError(f"split {cfg.data.train_split!r} under {root} is empty")
    world = backend.workers(cfg.ray)
    return TrainingPlan(cfg, paths, root, n_train=n_train, world=world,
                        uses_ray=backend.uses_ray,
                        steps=steps_per_epoch(n_train, cfg.train.batch_size, world))


def _limited(n: int, limit: int) -> int:
    return min(n, limit) if limit else n


def steps_per_epoch(n_refs: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps of an epoch over ``n_refs`` good refs (for the per-iteration gamma ramp
    and the plan ``run.py train`` prints): batches of ``batch_size`` with a final single sample
    merged into its neighbour (:func:`gtms.data.reading.without_single_samples`).

    Exact for one worker. Several workers step together (DDP) as often as the one with the most
    batches; this assumes an even share, but worker ``r`` gets the refs with
    ``ref_id % world_size == r`` (:func:`gtms.data.pipeline.part_name`), so the busiest worker
    may get a few batches more (the loop records the real count).
    """
    share = math.ceil(n_refs / max(world_size, 1))
    sizes = [batch_size] * (share // batch_size) + ([share % batch_size] if share % batch_size
                                                    else [])
    merged = without_single_samples({"ref_id": np.zeros(size)} for size in sizes)
    return max(1, sum(1 for _ in merged))


def sample_specs(cfg: Config) -> dict[str, SampleSpec]:
    """What the pipeline makes of each ref for training and for validation."""
    return {role: spec_for(role, input_size=cfg.data.input_size, word_len=cfg.data.word_len,
                           mode=cfg.loss.mode, seed=cfg.train.seed) for role in ("train", "val")}


def print_plan(plan: TrainingPlan) -> None:
    cfg = plan.cfg
    # One worker's count is exact; several workers' shares (by ref_id) can be uneven.
    steps = f"{plan.steps} steps/epoch" if plan.world == 1 else \
        f"about {plan.steps} steps/epoch (the worker with the most batches sets the count)"
    say(f"run folder: {plan.paths.run_dir}")
    phase(f"training {cfg.model.preset} / {cfg.loss.mode} on {plan.n_train} "
          f"{cfg.data.train_split} refs, batch {cfg.train.batch_size} per worker, {steps} x "
          f"{cfg.train.epochs} epochs, {plan.world} worker(s)"
          f"{'' if plan.uses_ray else ' (no Ray)'}")


def in_memory_splits(cfg: Config, root: str, specs: dict, *,
                     ray_store: bool) -> dict[str, bool]:
    """Which preprocessed splits to keep in memory (val first, then train) under
    ``data.memory_budget_mb`` (and, on Ray, half the object store); prints the decision."""
    budget = cfg.data.memory_budget_mb << 20
    if ray_store:
        import ray

        store = ray.cluster_resources().get("object_store_memory", 0)
        budget = min(budget, int(store // 2)) if store else budget
    sizes = {}
    for role, split, limit in (("val", cfg.data.val_split, cfg.data.limit_eval_refs),
                               ("train", cfg.data.train_split, cfg.data.limit_train_refs)):
        sizes[role] = preprocessed_nbytes(specs[role], *split_size(root, split, limit))
    in_memory = dict(zip(sizes, fits_in_memory(list(sizes.values()), budget)))
    described = ", ".join(f"{role} {sizes[role] / 2**20:.0f} MB "
                          f"{'kept in memory' if in_memory[role] else 'streamed every epoch'}"
                          for role in sizes)
    say(f"preprocessed splits: {described} (budget {budget / 2**20:.0f} MB)")
    return in_memory
