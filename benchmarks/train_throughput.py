"""Training throughput, Ray Train against one plain process, on the same small training.

    python -m benchmarks.train_throughput                       # 3 epochs, 400 refs, 2 workers
    python -m benchmarks.train_throughput --epochs 4 --refs 0   # the whole train split
    python -m benchmarks.train_throughput --workers 4 --cpus 4  # scaling on a 4-core machine
    python -m benchmarks.train_throughput --only ray --set train.val_every=2

Runs ``fit()`` twice in this one process tree: ``--no-ray`` (the loop in this process) and Ray
Train with ``--workers`` workers (a local Ray started here), both on the laptop config
(``experiments/synthref.yaml``) limited to ``--refs`` train refs and ``--eval-refs`` val refs.
Prints per epoch, from each run's ``metrics.jsonl``:

* start-up: epoch start -> first train batch, and validation start -> first val batch;
* data wait: the share of the train phase the trainer spent waiting for its next batch;
* samples/s of all workers together (their samples over the slowest worker's train time);

then the medians over epochs 2.. (epoch 1 pays the one-off start), wall times and the ratios
Ray / plain. Not a timed test: the figures depend on the machine and its load (printed).

Scaling: run once with ``--workers 2`` and once with ``--workers 4 --cpus 4`` on a machine
with 4 free cores; the ratio of the two "samples/s all workers" medians is the scaling figure.

Threads: the plain process's torch uses every core for intra-op threads, a Ray Train worker one
per CPU it holds (Ray sets ``OMP_NUM_THREADS`` = ``ray.cpus_per_worker``). On a shared machine
that is already oversubscribed the plain process's threads collapse (measured on 2 cores at load
7-10: 1.0-1.7 samples/s, against 24.7 with ``OMP_NUM_THREADS=1``); there, run with
``OMP_NUM_THREADS=1`` and read the ratio as one-thread workers against one one-thread process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench_config(args: argparse.Namespace, run_dir: str, name: str, ray_workers: int):
    from gtms.config import load_config

    overrides = [f"data.root={args.root}", f"data.limit_train_refs={args.refs}",
                 f"data.limit_eval_refs={args.eval_refs}", f"train.epochs={args.epochs}",
                 f"train.run_dir={run_dir}", f"train.name={name}",
                 f"data.input_size={args.input_size}", f"ray.num_workers={ray_workers}"]
    if args.cpus:
        overrides.append(f"ray.local_num_cpus={args.cpus}")
    return load_config(args.config, overrides + list(args.set))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_one(args: argparse.Namespace, run_dir: str, kind: str) -> dict:
    from gtms.backend import backend_for
    from gtms.train.fit import fit

    no_ray = kind == "plain"
    cfg = bench_config(args, run_dir, f"bench-{kind}", 0 if no_ray else args.workers)
    start = time.perf_counter()
    summary = fit(cfg, backend_for(no_ray=no_ray))
    wall = time.perf_counter() - start
    return {"kind": kind, "wall_s": wall, "epochs": read_metrics(Path(summary["run_dir"])),
            "final_val_mean_iou": (summary.get("final") or {}).get("val_mean_iou")}


def _get(m: dict, key: str) -> float:
    value = m.get(key)
    return float("nan") if value is None else float(value)


def print_epochs(result: dict) -> None:
    from gtms.eval.metrics import percent

    final = result["final_val_mean_iou"]
    print(f"\n{result['kind']}: wall {result['wall_s']:.1f} s, final val mean IoU "
          f"{'-' if final is None else percent(final)}")
    print(f"  {'epoch':>5s} {'train start':>11s} {'val start':>9s} {'train s':>8s} "
          f"{'val s':>6s} {'data wait':>9s} {'samples/s all':>13s} {'val mIoU %':>10s}")
    for m in result["epochs"]:
        print(f"  {m['epoch']:5d} {_get(m, 'train_startup_s'):11.2f} "
              f"{_get(m, 'val_startup_s'):9.2f} {_get(m, 'train_seconds'):8.1f} "
              f"{_get(m, 'val_seconds'):6.1f} {100 * _get(m, 'train_data_wait'):8.1f}% "
              f"{_get(m, 'train_samples_per_s_total'):13.1f} {100 * _get(m, 'val_mean_iou'):10.2f}")


def steady(result: dict, key: str) -> float:
    """Median of ``key`` over epochs 2.. (over all epochs when there is only one); epochs
    without the key (e.g. not validated) are left out."""
    epochs = result["epochs"][1:] or result["epochs"]
    values = [float(m[key]) for m in epochs if m.get(key) is not None]
    return statistics.median(values) if values else float("nan")


SUMMARY_KEYS = (("train_startup_s", "train start-up s (epoch start -> first batch)"),
                ("val_startup_s", "val start-up s (val start -> first batch)"),
                ("train_data_wait", "data wait share of the train phase"),
                ("train_samples_per_s_total", "samples/s, all workers"))


def print_summary(results: dict[str, dict]) -> None:
    print("\nmedians over epochs 2..:")
    kinds = list(results)
    print(f"  {'':48s}" + "".join(f"{k:>10s}" for k in kinds)
          + ("  ratio ray/plain" if len(kinds) == 2 else ""))
    for key, label in SUMMARY_KEYS:
        values = [steady(results[k], key) for k in kinds]
        line = f"  {label:48s}" + "".join(f"{v:10.3f}" for v in values)
        if len(values) == 2:
            line += f"  {values[1] / values[0]:10.2f}" if values[0] else ""
        print(line)
    walls = [results[k]["wall_s"] for k in kinds]
    print(f"  {'wall time of fit() s':48s}" + "".join(f"{v:10.1f}" for v in walls)
          + (f"  {walls[1] / walls[0]:10.2f}" if len(walls) == 2 else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "experiments" / "synthref.yaml"))
    parser.add_argument("--root", default=str(REPO / "data" / "synthref"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--refs", type=int, default=400, help="train refs (0 = all)")
    parser.add_argument("--eval-refs", type=int, default=100, help="val refs (0 = all)")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--cpus", type=int, default=0,
                        help="logical CPUs of the local Ray (0 = the project's resource plan)")
    parser.add_argument("--only", choices=("both", "plain", "ray"), default="both")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for both runs (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args(argv)

    from gtms.data.synthref import ensure_synthref

    bench = bench_config(args, "unused", "unused", args.workers)
    ensure_synthref(args.root, num_images=bench.data.synthref_images,
                    seed=bench.data.synthref_seed, difficulty=bench.data.synthref_difficulty)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"{args.epochs} epochs, {args.refs or 'all'} train refs, {args.eval_refs or 'all'} "
          f"val refs, input {args.input_size}, Ray workers {args.workers}", flush=True)
    kinds = ("plain", "ray") if args.only == "both" else (args.only,)
    tmp = tempfile.mkdtemp(prefix="gtms-bench-")
    results = {}
    for kind in kinds:
        print(f"\n--- {kind} ---", flush=True)
        results[kind] = run_one(args, tmp, kind)
    for result in results.values():
        print_epochs(result)
    print_summary(results)
    print(f"load average now: {os.getloadavg()[0]:.2f}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"run folders kept under {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
