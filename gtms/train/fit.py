"""``run.py train`` on either backend: check the inputs, make the run folder, run the training
worker function (:func:`training_worker`) and write the summary.

The same function trains in this process (``--no-ray``: the worker reads and preprocesses its
batches itself) and on Ray Train's workers (each reads its own Ray Dataset shard, preprocessed
by Ray Data's actors); :mod:`gtms.backend` hides which.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gtms import storage
from gtms.backend import Backend, Worker
from gtms.config import Config, config_from_dict, config_to_dict, replace
from gtms.console import progress_every_s, say
from gtms.data.feeds import LocalFeed, RayFeed
from gtms.data.pipeline import PoolSpec, SampleSpec, build_dataset, part_name
from gtms.data.roots import prepare_data_root
from gtms.data.shards import verify_shards
from gtms.model.checkpoint import FILENAME as CHECKPOINT_FILE
from gtms.model.checkpoint import read_metrics
from gtms.pretrain.run import with_synthclip
from gtms.tracking import (
    Labels,
    check_trackers,
    finish_tracking,
    forwarded_environment,
    with_tracking_uri,
)
from gtms.train.loop import train_loop
from gtms.train.plan import (
    TrainingPlan,
    in_memory_splits,
    plan_training,
    print_plan,
    sample_specs,
)
from gtms.train.run_folder import (
    choose_run_folder,
    remove_unfinished_run,
    write_run_metadata,
)
from gtms.train.summary import summarise, write_summary


def fit(cfg: Config, backend: Backend, *, resume: str | None = None,
        set_overrides: tuple[str, ...] = (), callbacks: tuple = (),
        log_tag: str = "", labels: Labels | None = None) -> dict[str, Any]:
    """Train on ``backend``; returns the summary (also written to ``<run>/summary.json``).

    ``resume``: a run name, a run folder or ``"latest"`` (:func:`choose_run_folder`).
    ``callbacks``: Ray Train ``UserCallback`` objects (e.g. Tune's report forwarding).
    ``log_tag``: prefixes the epoch lines (``[tree s0]``: which trial of an ablation).
    ``labels``: the tracker run's name and tags (``train.trackers``; default: the folder's).
    """
    check_trackers(cfg)
    backend.start(cfg.ray)  # first: a bad --address fails before anything is checked or written
    cfg, paths = choose_run_folder(absolute_model_paths(cfg), resume=resume,
                                   set_overrides=set_overrides, local_only=not backend.uses_ray)
    cfg = with_tracking_uri(cfg, cfg.train.run_dir)
    cfg, root = prepare_inputs(cfg, backend, new_run=resume is None)
    plan = plan_training(cfg, paths, root, backend)
    try:  # everything that can fail early is checked: make the run folder
        write_run_metadata(paths.run_dir, cfg, world_size=plan.world)
        summary = run_training(plan, backend, callbacks=list(callbacks), log_tag=log_tag,
                               labels=labels)
    except Exception:
        if resume is None:
            remove_unfinished_run(paths.run_dir)
        raise
    write_summary(paths.run_dir, cfg, root, summary)
    finish_tracking(cfg, paths.run_dir, summary)
    return summary


def prepare_inputs(cfg: Config, backend: Backend, *, new_run: bool) -> tuple[Config, str]:
    """Check the model weights, make sure the data exists (SynthRef may be generated) and its
    shards are whole, and, for a new run, pretrain SynthCLIP when the config asks for it.
    Returns the config (with the SynthCLIP weights) and the data root."""
    check_model_weights(cfg)
    root = prepare_data_root(cfg)
    verify_shards(root, (cfg.data.train_split, cfg.data.val_split))
    if new_run:
        cfg = with_synthclip(cfg, root, backend)
    return cfg, root


def check_model_weights(cfg: Config) -> None:
    """Build the model once with ``model.clip_weights`` / ``model.init_checkpoint``, so that a
    missing or unfitting weights file stops the run before its folder is made."""
    if not (cfg.model.clip_weights or cfg.model.init_checkpoint):
        return
    from gtms.model.build import build_model

    build_model(cfg.model.preset, word_len=cfg.data.word_len,
                clip_weights=cfg.model.clip_weights, init_checkpoint=cfg.model.init_checkpoint)


def absolute_model_paths(cfg: Config) -> Config:
    """Weights paths made absolute: Ray Train workers run in another directory."""
    changes = {key: storage.absolute(value) for key in ("clip_weights", "init_checkpoint")
               if (value := getattr(cfg.model, key))}
    return replace(cfg, model=changes) if changes else cfg


def run_training(plan: TrainingPlan, backend: Backend, *, callbacks: list,
                 log_tag: str = "", labels: Labels | None = None) -> dict[str, Any]:
    """The training worker function on ``backend``'s workers; returns the summary."""
    cfg = plan.cfg
    specs = sample_specs(cfg)
    print_plan(plan)
    in_memory = in_memory_splits(cfg, plan.root, specs, ray_store=backend.uses_ray)
    start = time.time()
    datasets = None
    if backend.uses_ray:
        datasets = training_datasets(cfg, plan.root, specs, in_memory)
        say(f"starting {cfg.ray.num_workers} Ray Train worker(s); progress every "
            f"{progress_every_s():.0f} s, one line per epoch")
    result = backend.run(
        training_worker, {"config": config_to_dict(cfg), "root": plan.root,
                          "run_dir": plan.paths.run_dir, "steps_per_epoch": plan.steps,
                          "in_memory": in_memory, "log_tag": log_tag,
                          "tracking": {"labels": labels.to_dict() if labels else None,
                                       "env": forwarded_environment()}},
        storage=plan.paths.storage, name=plan.paths.name, ray=cfg.ray,
        keep=cfg.train.keep_checkpoints, datasets=datasets, callbacks=callbacks,
        checkpoint_metrics=_checkpoint_metrics)
    summary = summarise(result)
    summary["wall_time_s"] = round(time.time() - start, 1)
    return summary


def _checkpoint_metrics(folder: Path) -> dict | None:
    """The metrics of a checkpoint folder an earlier session of a local run left (None for a
    folder without a checkpoint file)."""
    return read_metrics(folder) if (folder / CHECKPOINT_FILE).is_file() else None


def training_worker(loop_config: dict, worker: Worker) -> None:
    """The worker function: the training loop on this worker's batches (its Ray Dataset
    shards, or read and preprocessed in its own process)."""
    cfg = config_from_dict(loop_config["config"], "<run config>")
    if worker.uses_ray:
        feed = RayFeed(worker.dataset_shard, rank=worker.rank, seed=cfg.train.seed)
    else:
        specs, in_memory = sample_specs(cfg), loop_config["in_memory"]
        feed = LocalFeed(root=loop_config["root"], train_split=cfg.data.train_split,
                         val_split=cfg.data.val_split, train_spec=specs["train"],
                         val_spec=specs["val"], limit_train=cfg.data.limit_train_refs,
                         limit_eval=cfg.data.limit_eval_refs, strict=cfg.data.strict,
                         in_memory_train=in_memory["train"], in_memory_val=in_memory["val"])
    train_loop(cfg, worker, feed, run_dir=loop_config["run_dir"],
               steps_per_epoch=loop_config["steps_per_epoch"],
               log_tag=loop_config.get("log_tag", ""), tracking=loop_config.get("tracking"))


def training_datasets(cfg: Config, root: str, specs: dict[str, SampleSpec],
                      in_memory: dict[str, bool]) -> dict[str, Any]:
    """Each worker's own train and val Ray Datasets (:func:`gtms.data.pipeline.part_name`:
    worker ``r`` of ``n`` gets the refs with ``ref_id % n == r``, in a fixed order); parts
    that fit in memory are preprocessed once here."""
    world = max(cfg.ray.num_workers, 1)
    pool = PoolSpec.of(cfg.ray).per_part(world)
    splits = {"train": (cfg.data.train_split, cfg.data.limit_train_refs, cfg.train.seed),
              "val": (cfg.data.val_split, cfg.data.limit_eval_refs, None)}
    datasets = {}
    for role in ("val", "train"):  # preprocessing does not depend on the epoch: do it once
        split, limit, shuffle_seed = splits[role]
        parts = [build_dataset(root, split, specs[role], pool, strict=cfg.data.strict,
                               limit=limit, shuffle_seed=shuffle_seed, part=(rank, world))
                 for rank in range(world)]
        if in_memory[role]:
            started = time.perf_counter()
            say(f"preprocessing {role} once (decode, letterbox, trees) to keep it in memory")
            parts = materialized(parts)
            say(f"preprocessed {role} in {time.perf_counter() - started:.1f} s")
        datasets.update({part_name(role, rank): part for rank, part in enumerate(parts)})
    return datasets


def materialized(datasets: list) -> list:
    """``datasets`` preprocessed at once (their pipelines side by side, as the workers' would
    run when streamed), each kept in the object store."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(datasets)) as pool:
        return list(pool.map(lambda ds: ds.materialize(), datasets))
