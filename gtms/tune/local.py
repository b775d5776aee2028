"""``run.py ablate --no-ray``: the Table 2 trials as plain processes on this machine.

Each trial is one ``python -m gtms.tune.local SPEC.json`` child that trains with the ``--no-ray``
loop, evaluates its best checkpoint on every split (preprocessing in the process, no Ray) and
writes ``<out>/trials/<row>-s<seed>/trial.json``: the same final result a Ray Tune trial reports.
The driver keeps ``--max-concurrent`` children running, each with an equal share of the cores
(``OMP_NUM_THREADS``), logs each to ``<out>/trials/<row>-s<seed>.log`` and prints progress.

Why: on a 2-core laptop Ray Tune + Ray Train trials (each with its preprocessing actors)
took ~1.7x the wall time per trial of plain processes (README, "Table 2 on the laptop"). A
cluster keeps using Ray Tune.

An interrupted ablation continues with ``--resume``: finished trials (``trial.json``) are kept,
an unfinished run resumes at its next epoch, a trained run that lacks its evaluation is only
evaluated (an ``eval.json`` beside the best checkpoint with every split is reused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtms.config import Config, config_to_dict, replace

TRIAL_FILE = "trial.json"
SPEC_FILE = "trial-spec.json"


def trial_name(mode: str, seed: int) -> str:
    return f"{mode}-s{seed}"


def threads_per_trial(concurrent: int, cores: int | None = None) -> int:
    """An equal share of the cores for each of ``concurrent`` trials, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    return max(1, cores // max(concurrent, 1))


def read_trial(folder: Path) -> dict[str, Any] | None:
    """A finished trial's ``trial.json`` (``mode``, ``seed``, ``metrics``, ``base``), or None."""
    path = folder / TRIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finished_local_trials(trials_dir: Path) -> list[dict[str, Any]]:
    return [t for folder in sorted(p for p in trials_dir.iterdir() if p.is_dir())
            if (t := read_trial(folder)) is not None] if trials_dir.is_dir() else []


def reusable_eval(best_checkpoint: str, cfg: Config, splits: list[str]) -> dict | None:
    """``eval.json`` beside the best checkpoint when it scored every split at this config's
    threshold and input size (a trial that was evaluated before being interrupted)."""
    path = Path(best_checkpoint) / "eval.json"
    if not path.is_file():
        return None
    from gtms.eval.evaluate import SENTENCES, read_sentence_ious, sentences_path

    report = json.loads(path.read_text())
    same = (report.get("threshold") == cfg.train.threshold
            and report.get("input_size") == cfg.data.input_size
            and all(split in report.get("splits", {}) for split in splits))
    if not same:
        return None
    sentences = Path(sentences_path(str(path)))
    if sentences.is_file():   # an evaluation from before they were stored has none
        for split, arrays in read_sentence_ious(sentences.read_bytes()).items():
            if split in report["splits"]:
                report["splits"][split][SENTENCES] = arrays
    return report


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one trial without Ray, evaluate it and write its ``trial.json``."""
    from gtms.eval.evaluate import evaluate
    from gtms.train.trainer import fit
    from gtms.tune.trial import apply_params, save_sentence_ious, trial_metrics

    cfg = apply_params(spec["base"], spec["params"])
    cfg = replace(cfg, train={"run_dir": spec["storage"], "name": spec["name"]})
    run_dir = Path(spec["storage"]) / spec["name"]
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"{spec['name']}: trained before, evaluating its best checkpoint", flush=True)
    else:
        resume = spec["name"] if (run_dir / "config.yaml").is_file() else None
        summary = fit(cfg, resume=resume, no_ray=True)
    splits = list(spec["splits"])
    report = reusable_eval(summary["best_checkpoint"], cfg, splits)
    if report is None:
        report = evaluate(summary["best_checkpoint"], cfg, splits, no_ray=True,
                          out=Path(summary["best_checkpoint"]) / "eval.json")
    trial = {"mode": spec["params"]["loss.mode"], "seed": spec["params"]["train.seed"],
             "metrics": trial_metrics(summary, report,
                                      sentence_ious=save_sentence_ious(report, str(run_dir))),
             "base": spec["base"]}
    tmp = run_dir / (TRIAL_FILE + ".tmp")
    tmp.write_text(json.dumps(trial, indent=2))
    tmp.replace(run_dir / TRIAL_FILE)
    return trial


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)


def _last_epoch(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1]).get("epoch", 0)) if lines else 0


def _tail(path: Path, n: int = 6) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in lines[-n:])


def run_local_trials(cfg: Config, *, rows: list[str], seed_values: list[int], splits: list[str],
                     trials_dir: Path, max_concurrent: int,
                     poll_s: float = 2.0) -> tuple[list[dict], list[str]]:
    """Run every (row, seed) trial not finished yet as a child process, ``max_concurrent`` at
    a time. Returns the finished trials (also those of earlier runs) and the failed ones'
    descriptions."""
    trials_dir.mkdir(parents=True, exist_ok=True)
    base = config_to_dict(cfg)
    queue = []
    for seed in seed_values:          # seed-major: an interrupted table has whole seeds first
        for row in rows:
            name = trial_name(row, seed)
            if read_trial(trials_dir / name) is None:
                spec = {"base": base, "params": {"loss.mode": row, "train.seed": seed},
                        "storage": str(trials_dir), "name": name, "splits": splits}
                queue.append((name, spec))
    total = len(rows) * len(seed_values)
    threads = threads_per_trial(max_concurrent)
    print(f"ablation (no Ray): {total - len(queue)} of {total} trials finished before, "
          f"{len(queue)} to run, {max_concurrent} at a time with {threads} thread(s) each; "
          f"logs in {trials_dir}/<row>-s<seed>.log", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    running: list[Running] = []
    failed: list[str] = []
    done = total - len(queue)
    last_status = time.time()
    try:
        while queue or running:
            while queue and len(running) < max_concurrent:
                name, spec = queue.pop(0)
                spec_path = trials_dir / f"{name}.{SPEC_FILE}"
                spec_path.write_text(json.dumps(spec))
                log = trials_dir / f"{name}.log"
                with log.open("a") as handle:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "gtms.tune.local", str(spec_path)], env=env,
                        stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                running.append(Running(name, process, log))
                print(f"  started {name}", flush=True)
            time.sleep(poll_s)
            for trial in [t for t in running if t.process.poll() is not None]:
                running.remove(trial)
                minutes = (time.time() - trial.started) / 60
                result = read_trial(trials_dir / trial.name)
                if trial.process.returncode == 0 and result is not None:
                    done += 1
                    scores = ", ".join(f"{s} {100 * result['metrics'][f'{s}_mean_iou']:.2f}"
                                       for s in splits)
                    print(f"  finished {trial.name} in {minutes:.1f} min: mean IoU % {scores} "
                          f"({done}/{total})", flush=True)
                else:
                    failed.append(f"{trial.name} (exit {trial.process.returncode}, log "
                                  f"{trial.log})")
                    print(f"  FAILED {trial.name} after {minutes:.1f} min, exit "
                          f"{trial.process.returncode}; last lines of {trial.log}:\n"
                          f"{_tail(trial.log)}", file=sys.stderr, flush=True)
            if running and time.time() - last_status >= 60:
                last_status = time.time()
                epochs = ", ".join(f"{t.name} epoch {_last_epoch(trials_dir / t.name)}/"
                                   f"{cfg.train.epochs}" for t in running)
                print(f"  {done}/{total} finished, {len(queue)} queued; running: {epochs}",
                      flush=True)
    except KeyboardInterrupt:
        for trial in running:
            trial.process.terminate()
        for trial in running:
            trial.process.wait()
        print("interrupted: the running trials were stopped; --resume continues them at "
              "their next epoch", file=sys.stderr, flush=True)
        raise
    return finished_local_trials(trials_dir), failed


def main(argv: list[str]) -> int:
    """Child entry: ``python -m gtms.tune.local SPEC.json``."""
    from gtms.errors import UserError

    spec = json.loads(Path(argv[0]).read_text())
    try:
        run_one(spec)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
