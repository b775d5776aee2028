"""``run.py sweep``: a hyper-parameter search defined in a sweep YAML."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from gtms.commands.common import add_backend_flags, backend_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="search σ, γ schedules, lr … from a sweep YAML with Ray Tune",
        description="Run the search space in the file's 'sweep:' section (grid / choice / "
                    "uniform / loguniform / randint over config keys; optional ASHA early "
                    "stopping; max_concurrent_trials) as Ray Tune trials, print the trials "
                    "sorted by the metric and write the best configuration as a ready-to-run "
                    "experiment YAML (best.yaml).")
    parser.add_argument("--config", required=True, metavar="YAML",
                        help="sweep file, e.g. experiments/sweep_sigma.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a base-config key")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="experiment folder or bucket URI (s3://, gs://, file://; a URI on "
                             "a multi-node cluster) (default: <train.run_dir>/sweep-<file name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep in --out (restores the Tuner)")
    add_backend_flags(parser, no_ray=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms import storage
    from gtms.config import config_from_dict, config_to_dict
    from gtms.eval.metrics import format_metric
    from gtms.tune.sweep import load_sweep, run_sweep

    cfg, spec = load_sweep(args.config)
    if args.overrides:
        cfg = config_from_dict(config_to_dict(cfg), args.config, args.overrides)
    out = args.out or storage.join(cfg.train.run_dir, f"sweep-{Path(args.config).stem}")
    result = run_sweep(cfg, spec, out_dir=out, resume=args.resume,
                       backend=backend_from_args(args))
    print(f"\ntrials sorted by {spec.metric} ({spec.mode}):")
    for row in result["rows"]:
        value = row[spec.metric]
        shown = "failed" if value is None else format_metric(spec.metric, value)
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row["params"].items())
        print(f"  {shown:>8}  after {row['epochs']} epoch(s)  {params}")
    print(f"\nbest: {result['best']['params']} -> {result['best_yaml']}")
    if storage.is_uri(result["best_yaml"]):
        print(f"run it: copy {result['best_yaml']} to best.yaml, then "
              "python run.py train --config best.yaml")
    else:
        print("run it: " + shlex.join(["python", "run.py", "train", "--config",
                                       str(result["best_yaml"])]))
    print(f"wall time {result['wall_time_s']:.0f} s")
    return 0
