"""``run.py ablate``: the paper's Table 2 as Ray Tune trials."""

from __future__ import annotations

import argparse

from gtms.commands.common import (
    add_backend_flags,
    add_config_flags,
    backend_from_args,
    config_from_args,
)
from gtms.modes import ABLATION_MODES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ablate", help="run the Table 2 rows (mask-bce … forest-gradcam) and tabulate them",
        description="Train every ablation row with the same budget (the resolved config, only "
                    "loss.mode and train.seed change) as Ray Tune trials, evaluate each on "
                    "every data.eval_splits split, and write ablation.md / .csv / .json with "
                    "mean IoU and overall IoU, mean ± std over seeds (beside the paper's "
                    "numbers for RefCOCO). On a laptop trials queue one at a time; --no-ray "
                    "runs them as plain processes, several at a time, which is faster there.")
    add_config_flags(parser)
    parser.add_argument("--rows", default=",".join(ABLATION_MODES), metavar="A,B",
                        help=f"comma-separated rows (default: all: {', '.join(ABLATION_MODES)})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row (default 1)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="experiment folder or bucket URI (s3://, gs://, file://; a URI on "
                             "a multi-node cluster) (default: "
                             "<train.run_dir>/ablation-<dataset>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted ablation in --out (restores the Tuner; "
                             "with --no-ray keeps the finished trials and resumes the others)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the tables and ablation.png from the trials "
                             "that have finished in --out (an interrupted or running ablation)")
    parser.add_argument("--max-concurrent", type=int, default=1, metavar="N",
                        help="trials at once (default 1; raise it on a cluster)")
    add_backend_flags(parser, no_ray="the trials as plain processes on this machine (train "
                                     "and eval --no-ray), --max-concurrent at a time with an "
                                     "equal share of the cores each, logs in <out>/trials/; "
                                     "faster than Ray Tune on a small laptop (README, 'Table 2 "
                                     "on the laptop')")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms import storage
    from gtms.tune.ablation import report_ablation, run_ablation

    cfg = config_from_args(args)
    out = args.out or storage.join(cfg.train.run_dir, f"ablation-{cfg.data.dataset}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.report:
        result = report_ablation(out, rows)
        print("\n" + result["markdown"])
        print(f"tables in {result['out_dir']}")
        return 0
    result = run_ablation(cfg, rows=[r.strip() for r in args.rows.split(",") if r.strip()],
                          seeds=args.seeds, out_dir=out, resume=args.resume,
                          max_concurrent=args.max_concurrent,
                          backend=backend_from_args(args))
    print("\n" + result["markdown"])
    print(f"wall time {result['wall_time_s']:.0f} s; tables in {result['out_dir']}")
    return 0
