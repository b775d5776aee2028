"""``run.py ablate --no-ray``: the Table 2 trials as plain processes on this machine.

Each trial is one ``python -m gtms.tune.local SPEC.json`` child running
:func:`gtms.tune.trial.run_trial` on the local backend (train and evaluate without Ray, the
same resume rule as a Ray Tune trial). The driver keeps ``--max-concurrent`` children running,
each with an equal share of the cores (``OMP_NUM_THREADS``; set before the child imports torch,
which is why these are processes and not a pool of forked workers), logs each to
``<out>/trials/<row>-s<seed>.log`` and prints progress.

Why: on a 2-core laptop Ray Tune + Ray Train trials (each with its preprocessing actors) took
~1.7x the wall time per trial of plain processes (docs/RESULTS.md). A cluster keeps Ray Tune.
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

from gtms.config import Config, config_to_dict
from gtms.tune.trial import read_trial, trial_name

SPEC_FILE = "trial-spec.json"
STATUS_EVERY_S = 60.0


def threads_per_trial(concurrent: int, cores: int | None = None) -> int:
    """An equal share of the cores for each of ``concurrent`` trials, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    return max(1, cores // max(concurrent, 1))


def finished_local_trials(trials_dir: Path) -> list[dict[str, Any]]:
    """Every trial under ``trials_dir`` that wrote its ``trial.json``."""
    if not trials_dir.is_dir():
        return []
    return [t for folder in sorted(p for p in trials_dir.iterdir() if p.is_dir())
            if (t := read_trial(str(folder))) is not None]


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)

    def minutes(self) -> float:
        return (time.time() - self.started) / 60


@dataclass
class LocalTrials:
    """The trials of an ablation as child processes, ``max_concurrent`` at a time."""

    cfg: Config
    trials_dir: Path
    splits: list[str]
    max_concurrent: int
    poll_s: float = 2.0
    tracking: dict | None = None   # the ablation's parent tracker run (gtms.tune.tracked)
    queue: list[tuple[str, dict]] = field(default_factory=list)
    running: list[Child] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    done: int = 0
    total: int = 0

    def plan(self, rows: list[str], seed_values: list[int]) -> None:
        """Queue every (row, seed) without a ``trial.json``, seed-major (an interrupted table
        has whole seeds first)."""
        base = config_to_dict(self.cfg)
        for seed in seed_values:
            for row in rows:
                name = trial_name(row, seed)
                if read_trial(str(self.trials_dir / name)) is None:
                    self.queue.append((name, {
                        "base": base, "params": {"loss.mode": row, "train.seed": seed},
                        "storage": str(self.trials_dir), "name": name,
                        "splits": self.splits, "tracking": self.tracking}))
        self.total = len(rows) * len(seed_values)
        self.done = self.total - len(self.queue)

    def child_env(self) -> dict[str, str]:
        threads = str(threads_per_trial(self.max_concurrent))
        repo = str(Path(__file__).resolve().parents[2])
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PYTHONPATH": os.pathsep.join(filter(None, [repo,
                                                            os.environ.get("PYTHONPATH")]))}

    def start_next(self) -> None:
        name, spec = self.queue.pop(0)
        spec_path = self.trials_dir / f"{name}.{SPEC_FILE}"
        spec_path.write_text(json.dumps(spec))
        log = self.trials_dir / f"{name}.log"
        with log.open("a") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "gtms.tune.local", str(spec_path)], env=self.child_env(),
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.running.append(Child(name, process, log))
        print(f"  started {name}", flush=True)

    def collect(self, child: Child) -> None:
        """Note a child that exited: finished (with its scores) or failed (with its log)."""
        self.running.remove(child)
        result = read_trial(str(self.trials_dir / child.name))
        code = child.process.returncode
        if code == 0 and result is not None:
            self.done += 1
            scores = ", ".join(f"{s} {100 * result['metrics'][f'{s}_mean_iou']:.2f}"
                               for s in self.splits)
            print(f"  finished {child.name} in {child.minutes():.1f} min: mean IoU % {scores} "
                  f"({self.done}/{self.total})", flush=True)
            return
        self.failed.append(f"{child.name} (exit {code}, log {child.log})")
        print(f"  FAILED {child.name} after {child.minutes():.1f} min, exit {code}; last lines "
              f"of {child.log}:\n{_tail(child.log)}", file=sys.stderr, flush=True)

    def status(self) -> str:
        epochs = ", ".join(f"{c.name} epoch {_last_epoch(self.trials_dir / c.name)}/"
                           f"{self.cfg.train.epochs}" for c in self.running)
        return f"  {self.done}/{self.total} finished, {len(self.queue)} queued; running: {epochs}"

    def run(self) -> None:
        """Run the queue to its end; Ctrl-C stops the running children (``--resume``
        continues them at their next epoch)."""
        last_status = time.time()
        try:
            while self.queue or self.running:
                while self.queue and len(self.running) < self.max_concurrent:
                    self.start_next()
                time.sleep(self.poll_s)
                for child in [c for c in self.running if c.process.poll() is not None]:
                    self.collect(child)
                if self.running and time.time() - last_status >= STATUS_EVERY_S:
                    last_status = time.time()
                    print(self.status(), flush=True)
        except KeyboardInterrupt:
            self.stop()
            raise

    def stop(self) -> None:
        for child in self.running:
            child.process.terminate()
        for child in self.running:
            child.process.wait()
        print("interrupted: the running trials were stopped; --resume continues them at "
              "their next epoch", file=sys.stderr, flush=True)


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
                     trials_dir: Path, max_concurrent: int, poll_s: float = 2.0,
                     tracking: dict | None = None) -> tuple[list[dict], list[str]]:
    """Run every (row, seed) trial not finished yet as a child process, ``max_concurrent`` at
    a time. Returns the finished trials (also those of earlier runs) and the failed ones'
    descriptions."""
    trials_dir.mkdir(parents=True, exist_ok=True)
    pool = LocalTrials(cfg, trials_dir, splits, max_concurrent, poll_s, tracking=tracking)
    pool.plan(rows, seed_values)
    print(f"ablation (no Ray): {pool.done} of {pool.total} trials finished before, "
          f"{len(pool.queue)} to run, {max_concurrent} at a time with "
          f"{threads_per_trial(max_concurrent)} thread(s) each; logs in "
          f"{trials_dir}/<row>-s<seed>.log", flush=True)
    pool.run()
    return finished_local_trials(trials_dir), pool.failed


def main(argv: list[str]) -> int:
    """Child entry: ``python -m gtms.tune.local SPEC.json``."""
    from gtms.backend.local import LocalBackend
    from gtms.errors import UserError
    from gtms.tune.trial import run_trial

    spec = json.loads(Path(argv[0]).read_text())
    try:
        run_trial(spec, LocalBackend())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
