"""Driver side of ``run.py train``: dataset check, run folder, and the TorchTrainer around the loop.

A run lives in ``<train.run_dir>/<name>/``: ``config.yaml`` (resolved), ``run.json`` (git SHA,
package versions, seeds, command), ``metrics.jsonl``, ``tb/`` (TensorBoard), Ray's
``checkpoint_epoch_0001/model.pt`` … folders, ``summary.json`` at the end (with the commands to
evaluate, predict and visualize, the example image ``example_ref<id>.<ext>`` for the predict
command). Epochs are counted from 1 everywhere, as printed. The folder is made once everything
that can fail early (data, SynthCLIP, model weights) has been checked, and a new run that fails
before its first epoch finishes is removed again.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtms import storage
from gtms.config import Config, config_to_dict, dump_config
from gtms.console import phase, progress_every_s, say
from gtms.data.pipeline import (
    PoolSpec,
    SampleSpec,
    build_dataset,
    fits_in_memory,
    part_name,
    per_worker_data_config,
    preprocessed_nbytes,
    spec_for,
    split_size,
)
from gtms.data.roots import prepare_data_root
from gtms.data.shards import verify_shards
from gtms.errors import UserError
from gtms.eval.metrics import percent
from gtms.pretrain.run import with_synthclip
from gtms.train import retention
from gtms.train.checkpoint import checkpoint_dir_name
from gtms.train.contexts import (
    LocalContext,
    RayTrainContext,
    count_rows,
    iter_shard_rows,
    steps_per_epoch,
)
from gtms.train.loop import train_loop


class RunError(UserError, RuntimeError):
    """A run cannot start (missing data, existing run folder, bad resume target)."""


@dataclass(frozen=True)
class RunPaths:
    storage: str           # train.run_dir: an absolute local path or a URI
    name: str

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


def default_run_name(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{cfg.model.preset}-{cfg.loss.mode}-{stamp}"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "numpy", "pyarrow", "numba", "opencv-python-headless",
                 "instant-clip-tokenizer", "pycocotools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def write_run_metadata(run_dir: str, cfg: Config, *, world_size: int) -> None:
    folder = storage.RunFolder(run_dir)
    (folder.path / "config.yaml").write_text(dump_config(cfg))
    meta = {"git_sha": git_sha(), "versions": package_versions(), "command": sys.argv,
            "seeds": {"base": cfg.train.seed,
                      "per_rank": [cfg.train.seed + r for r in range(max(world_size, 1))],
                      "sentence_and_shuffle": cfg.train.seed},
            "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder.path / "run.json").write_text(json.dumps(meta, indent=2))
    folder.sync()


def plan_run(cfg: Config, *, resume: str | None, set_overrides: tuple[str, ...] = (),
             no_ray: bool = False) -> tuple[Config, RunPaths]:
    """Pick the run folder and the config to run. ``resume`` = a run name, a run folder, or
    ``"latest"``; a resumed run uses its own ``config.yaml`` with ``set_overrides`` on top
    (e.g. ``--set train.epochs=20`` to train longer)."""
    base = storage.absolute(cfg.train.run_dir)
    if resume is None:
        name = cfg.train.name or default_run_name(cfg)
        if storage.exists(storage.join(base, name)):
            raise RunError(f"run folder {storage.join(base, name)} exists; pass --resume {name}"
                           " to continue it or choose another train.name")
        paths = RunPaths(base, name)
    else:
        paths = _resumed_paths(base, resume)
        config_file = storage.join(paths.run_dir, "config.yaml")
        if not storage.exists(config_file):
            raise RunError(f"--resume: {paths.run_dir} is not a run folder (no config.yaml)")
        cfg = _load_remote_config(config_file, set_overrides)
    if no_ray and storage.is_uri(paths.storage):
        raise RunError("--no-ray needs a local train.run_dir (Ray writes URIs)")
    return cfg, paths


def _resumed_paths(base: str, resume: str) -> RunPaths:
    if resume == "latest":
        if storage.is_uri(base):
            raise RunError("--resume latest needs a local train.run_dir; name the run instead")
        runs = sorted(Path(base).glob("*/config.yaml"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise RunError(f"--resume latest: no runs under {base}")
        return RunPaths(str(runs[-1].parent.parent), runs[-1].parent.name)
    if not storage.is_uri(resume) and Path(resume).is_dir():
        return RunPaths(str(Path(resume).resolve().parent), Path(resume).resolve().name)
    return RunPaths(base, resume)


def _load_remote_config(config_file: str, overrides: tuple[str, ...] = ()) -> Config:
    from gtms.config import config_from_dict, parse_yaml_bytes

    return config_from_dict(parse_yaml_bytes(storage.read_bytes(config_file), config_file),
                            config_file, overrides)


@dataclass(frozen=True)
class RunPlan:
    """What :func:`fit` settles before the run folder is made."""

    cfg: Config
    paths: RunPaths
    root: str          # the data root, its shards checked
    n_train: int       # training refs per epoch
    world: int         # training processes: 1 without Ray, else ray.num_workers
    steps: int         # optimizer steps per epoch (see steps_per_epoch)
    no_ray: bool


def fit(cfg: Config, *, resume: str | None = None, no_ray: bool = False,
        address: str | None = None, set_overrides: tuple[str, ...] = (),
        callbacks: tuple = ()) -> dict[str, Any]:
    """Train; returns the summary (also written to ``<run>/summary.json``).

    ``callbacks``: Ray Train ``UserCallback`` objects (e.g. Tune's report forwarding).
    """
    if not no_ray:  # first: a bad --address fails before anything is checked or written
        start_ray(cfg, address)
    cfg, paths = plan_run(_absolute_model_paths(cfg), resume=resume,
                          set_overrides=set_overrides, no_ray=no_ray)
    cfg, root = prepare_inputs(cfg, new_run=resume is None, no_ray=no_ray, address=address)
    plan = plan_epochs(cfg, paths, root, no_ray=no_ray)
    try:  # everything that can fail early is checked: make the run folder
        write_run_metadata(paths.run_dir, cfg, world_size=plan.world)
        summary = train(plan, callbacks=list(callbacks))
    except Exception:
        if resume is None:
            remove_unfinished_run(paths.run_dir)
        raise
    write_summary(plan, summary)
    return summary


def start_ray(cfg: Config, address: str | None) -> None:
    """Join or start the Ray cluster this run (and its SynthCLIP pretraining) uses."""
    from gtms.runtime import init_ray

    init_ray(cfg.ray, cli_address=address)


def prepare_inputs(cfg: Config, *, new_run: bool, no_ray: bool,
                   address: str | None) -> tuple[Config, str]:
    """Check the model weights, make sure the data exists (SynthRef may be generated) and its
    shards are whole, and, for a new run, pretrain SynthCLIP when the config asks for it.
    Returns the config (with the SynthCLIP weights) and the data root."""
    check_model_weights(cfg)
    root = prepare_data_root(cfg)
    verify_shards(root, (cfg.data.train_split, cfg.data.val_split))
    if new_run:
        cfg = with_synthclip(cfg, root, no_ray=no_ray, address=address)
    return cfg, root


def plan_epochs(cfg: Config, paths: RunPaths, root: str, *, no_ray: bool) -> RunPlan:
    """Count the training refs, the workers and the optimizer steps of an epoch."""
    n_train = _limited(count_rows(root, cfg.data.train_split), cfg.data.limit_train_refs)
    if n_train == 0:
        raise RunError(f"split {cfg.data.train_split!r} under {root} is empty")
    world = 1 if no_ray else max(cfg.ray.num_workers, 1)
    return RunPlan(cfg, paths, root, n_train=n_train, world=world, no_ray=no_ray,
                   steps=steps_per_epoch(n_train, cfg.train.batch_size, world))


def _limited(n: int, limit: int) -> int:
    return min(n, limit) if limit else n


def sample_specs(cfg: Config) -> dict[str, SampleSpec]:
    """What the pipeline makes of each ref for training and for validation."""
    return {role: spec_for(role, input_size=cfg.data.input_size, word_len=cfg.data.word_len,
                           mode=cfg.loss.mode, seed=cfg.train.seed) for role in ("train", "val")}


def print_plan(plan: RunPlan) -> None:
    cfg = plan.cfg
    # One worker's count is exact; several workers' shares (by ref_id) can be uneven.
    steps = f"{plan.steps} steps/epoch" if plan.world == 1 else \
        f"about {plan.steps} steps/epoch (the worker with the most batches sets the count)"
    say(f"run folder: {plan.paths.run_dir}")
    phase(f"training {cfg.model.preset} / {cfg.loss.mode} on {plan.n_train} "
          f"{cfg.data.train_split} refs, batch {cfg.train.batch_size} per worker, {steps} x "
          f"{cfg.train.epochs} epochs, {plan.world} worker(s)"
          f"{' (no Ray)' if plan.no_ray else ''}")


def train(plan: RunPlan, *, callbacks: list) -> dict[str, Any]:
    """Run the training loop in this process or on Ray Train; returns the summary."""
    specs = sample_specs(plan.cfg)
    print_plan(plan)
    keep = memory_plan(plan.cfg, plan.root, specs, ray_store=not plan.no_ray)
    start = time.time()
    if plan.no_ray:
        summary = fit_locally(plan, specs, keep)
    else:
        summary = fit_on_ray(plan, specs, keep, callbacks)
    summary["wall_time_s"] = round(time.time() - start, 1)
    return summary


def write_summary(plan: RunPlan, summary: dict[str, Any]) -> None:
    """Add the next-step commands to ``summary`` and write it to ``<run>/summary.json``."""
    folder = storage.RunFolder(plan.paths.run_dir)
    summary["next_steps"] = next_steps(plan.cfg, plan.root, summary.get("best_checkpoint"),
                                       folder.path)
    (folder.path / "summary.json").write_text(json.dumps(summary, indent=2))
    folder.sync()


def check_model_weights(cfg: Config) -> None:
    """Build the model once with ``model.clip_weights`` / ``model.init_checkpoint``, so that a
    missing or unfitting weights file stops the run before its folder is made."""
    if not (cfg.model.clip_weights or cfg.model.init_checkpoint):
        return
    from gtms.model.build import build_model

    build_model(cfg.model.preset, word_len=cfg.data.word_len,
                clip_weights=cfg.model.clip_weights, init_checkpoint=cfg.model.init_checkpoint)


def remove_unfinished_run(run_dir: str) -> None:
    """Remove the folder of a new run that failed before finishing an epoch (nothing in it to
    resume from), so that the same command can simply be run again."""
    if storage.exists(storage.join(run_dir, "metrics.jsonl")) or not storage.exists(run_dir):
        return
    storage.remove_dir(run_dir)
    say(f"removed the run folder {run_dir}: the run failed before its first epoch finished",
        stream=sys.stderr)


def memory_plan(cfg: Config, root: str, specs: dict, *, ray_store: bool) -> dict[str, bool]:
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
    keep = dict(zip(sizes, fits_in_memory(list(sizes.values()), budget)))
    described = ", ".join(f"{role} {sizes[role] / 2**20:.0f} MB "
                          f"{'kept in memory' if keep[role] else 'streamed every epoch'}"
                          for role in sizes)
    say(f"preprocessed splits: {described} (budget {budget / 2**20:.0f} MB)")
    return keep


def _absolute_model_paths(cfg: Config) -> Config:
    """Weights paths made absolute: Ray Train workers run in another directory."""
    from gtms.config import replace

    changes = {key: storage.absolute(value) for key in ("clip_weights", "init_checkpoint")
               if (value := getattr(cfg.model, key))}
    return replace(cfg, model=changes) if changes else cfg


def summarise(run_dir: str, checkpoints: list[tuple[str, dict]], final: dict,
              latest: str | None) -> dict[str, Any]:
    """The summary of a finished run from its kept checkpoints ``(location, metrics)``: the
    best by :func:`gtms.train.retention.best` (the latest when no epoch was validated)."""
    best = retention.best([metrics for _, metrics in checkpoints])
    if best is None:  # no epoch was validated: the latest stands in
        return {"run_dir": run_dir, "final": final, "best": final, "best_checkpoint": latest,
                "latest_checkpoint": latest}
    where = next(where for where, metrics in checkpoints if metrics is best)
    return {"run_dir": run_dir, "final": final, "best": best, "best_checkpoint": where,
            "latest_checkpoint": latest}


def fit_locally(plan: RunPlan, specs: dict[str, SampleSpec],
                keep: dict[str, bool]) -> dict[str, Any]:
    """The loop in this process (``--no-ray``), checkpoints kept as on Ray."""
    cfg, run_dir = plan.cfg, Path(plan.paths.run_dir)
    ctx = LocalContext(root=plan.root, train_split=cfg.data.train_split,
                       val_split=cfg.data.val_split, train_spec=specs["train"],
                       val_spec=specs["val"], limit_train=cfg.data.limit_train_refs,
                       limit_eval=cfg.data.limit_eval_refs, strict=cfg.data.strict,
                       checkpoint_root=run_dir, keep_checkpoints=cfg.train.keep_checkpoints,
                       keep_train=keep["train"], keep_val=keep["val"])
    final = train_loop(config_to_dict(cfg), ctx, run_dir=str(run_dir), steps_per_epoch=plan.steps)
    kept = [(str(run_dir / checkpoint_dir_name(epoch)), metrics)
            for epoch, metrics in ctx.checkpoints.items()]
    latest = str(run_dir / checkpoint_dir_name(max(ctx.checkpoints))) if ctx.checkpoints else None
    return summarise(str(run_dir), kept, final, latest)


def _ray_worker(loop_config: dict) -> dict:
    """One Ray Train worker: the loop under a :class:`RayTrainContext`."""
    ctx = RayTrainContext(seed=loop_config["config"]["train"]["seed"])
    try:
        return train_loop(loop_config["config"], ctx, run_dir=loop_config["run_dir"],
                          steps_per_epoch=loop_config["steps_per_epoch"])
    finally:
        ctx.close()


def ray_datasets(cfg: Config, root: str, specs: dict[str, SampleSpec],
                 keep: dict[str, bool]) -> dict[str, Any]:
    """Each worker's own train and val Ray Datasets (:func:`gtms.data.pipeline.part_name`:
    worker ``r`` of ``n`` gets the refs with ``ref_id % n == r``, in a fixed order); parts
    that fit in memory are preprocessed once here."""
    world = max(cfg.ray.num_workers, 1)
    pool = PoolSpec(cfg.ray.preprocess_actors, cfg.ray.preprocess_actors_max,
                    cfg.ray.actor_cpus, batch_size=cfg.ray.preprocess_batch_size).per_part(world)
    splits = {"train": (cfg.data.train_split, cfg.data.limit_train_refs, cfg.train.seed),
              "val": (cfg.data.val_split, cfg.data.limit_eval_refs, None)}
    datasets = {}
    for role in ("val", "train"):  # preprocessing does not depend on the epoch: do it once
        split, limit, shuffle_seed = splits[role]
        parts = [build_dataset(root, split, specs[role], pool, strict=cfg.data.strict,
                               limit=limit, shuffle_seed=shuffle_seed, part=(rank, world))
                 for rank in range(world)]
        if keep[role]:
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


def fit_on_ray(plan: RunPlan, specs: dict[str, SampleSpec], keep: dict[str, bool],
               callbacks: list) -> dict[str, Any]:
    """The loop on Ray Train's TorchTrainer (Ray already started by :func:`start_ray`)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gtms.runtime import use_gpu

    cfg, paths = plan.cfg, plan.paths
    gpu = use_gpu(cfg.ray)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": config_to_dict(cfg), "run_dir": paths.run_dir,
                           "steps_per_epoch": plan.steps},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=paths.name, storage_path=paths.storage,
            checkpoint_config=retention.ray_checkpoint_config(cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks),
        datasets=ray_datasets(cfg, plan.root, specs, keep),
        dataset_config=per_worker_data_config(),
    )
    say(f"starting {cfg.ray.num_workers} Ray Train worker(s); progress every "
        f"{progress_every_s():.0f} s, one line per epoch")
    result = trainer.fit()

    def location(checkpoint):  # Ray's paths drop the URI scheme; keep it for users
        return storage.join(paths.run_dir, Path(checkpoint.path).name) if checkpoint else None

    kept = [(location(checkpoint), metrics) for checkpoint, metrics in result.best_checkpoints]
    return summarise(paths.run_dir, kept, result.metrics, location(result.checkpoint))


def _run_py() -> str:
    """``run.py`` as the printed commands name it: relative to the working directory when it
    lies below it, else absolute."""
    entry = Path(__file__).resolve().parents[2] / "run.py"
    try:
        return str(entry.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(entry)


def example_image(root: str, split: str, folder: Path) -> tuple[Path, str] | None:
    """Copy the image of the first usable ref of ``split`` into ``folder`` (as
    ``example_ref<id>.<ext>``) for the printed predict command; returns it and its first
    sentence, or None when no ref of the first few can be used."""
    import io

    from PIL import Image, UnidentifiedImageError

    for row in iter_shard_rows(root, split, limit=16):
        data = bytes(row["image"])
        sentences = [str(s).strip() for s in row["sentences"] if str(s).strip()]
        try:
            kind = Image.open(io.BytesIO(data)).format
        except (UnidentifiedImageError, OSError):
            continue
        if sentences and kind:
            suffix = "jpg" if kind == "JPEG" else kind.lower()
            path = folder / f"example_ref{int(row['ref_id'])}.{suffix}"
            path.write_bytes(data)
            return path, sentences[0]
    return None


def next_steps(cfg: Config, root: str, checkpoint: str | None,
               folder: Path) -> list[dict[str, str]]:
    """What to do with the trained model: ``what`` and a ``command`` that runs as printed (from
    the working directory of the training run)."""
    if not checkpoint:
        return []
    run, ckpt = f"python {shlex.quote(_run_py())}", shlex.quote(str(checkpoint))
    splits = ",".join(cfg.data.eval_splits)
    steps = [{"what": f"evaluate the best checkpoint on {', '.join(cfg.data.eval_splits)} "
                      "(training validated on " + cfg.data.val_split + " only)",
              "command": f"{run} eval --checkpoint {ckpt} --splits {splits}"}]
    example = example_image(root, cfg.data.val_split, folder)
    if example is not None:
        image, text = example
        out = "" if storage.is_uri(checkpoint) else \
            f" --out {shlex.quote(str(Path(checkpoint) / 'predictions'))}"
        steps.append({"what": f"segment what a sentence refers to in an image (here one of "
                              f"{cfg.data.val_split}; use your own)",
                      "command": f"{run} predict --checkpoint {ckpt} --image "
                                 f"{shlex.quote(str(image))} --text {shlex.quote(text)}{out}"})
    steps.append({"what": f"draw GTMS panels (forest, GradCAM, W, P^, prediction) for "
                          f"{cfg.data.val_split} samples",
                  "command": f"{run} visualize --checkpoint {ckpt} --split "
                             f"{shlex.quote(cfg.data.val_split)} --n 8"})
    return steps


def print_summary(summary: dict[str, Any]) -> None:
    """The end of ``run.py train``: where the run is, its val numbers (IoU in percent) and the
    commands to go on with."""
    best, final = summary.get("best") or {}, summary.get("final") or {}
    print("\n=== training finished ===")
    print(f"run folder:          {summary['run_dir']}")
    print(f"wall time:           {summary.get('wall_time_s', 0):.0f} s")
    if final:
        scores = f"  val mean IoU {percent(final['val_mean_iou'])}  overall IoU " \
            f"{percent(final['val_overall_iou'])}" if retention.validated(final) else ""
        print(f"final epoch:         {final['epoch']}{scores}")
    if retention.validated(best):
        print(f"best epoch:          {best['epoch']}  val mean IoU "
              f"{percent(best['val_mean_iou'])}")
    print(f"best checkpoint:     {summary.get('best_checkpoint')}")
    print(f"latest checkpoint:   {summary.get('latest_checkpoint')}")
    print(f"TensorBoard:         tensorboard --logdir {shlex.quote(summary['run_dir'] + '/tb')}")
    if summary.get("next_steps"):
        print("\nnext steps:")
        for step in summary["next_steps"]:
            print(f"  {step['what']}:\n    {step['command']}")
    sys.stdout.flush()
