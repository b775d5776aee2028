"""The GTMS training step (forest-gradcam) against the box-lloc step on the same batch.

    python -m benchmarks.train_step                                   # the laptop default
    python -m benchmarks.train_step --config experiments/refcoco_rn50.yaml --batch 4 --repeats 3
    python -m benchmarks.train_step --config experiments/refcoco_rn50.yaml --device cuda

One step is what ``gtms.train.loop.train_one_epoch`` does per batch: forward, pseudo labels
(modes ``tree`` and ``forest-gradcam``), the loss terms, backward and the optimiser update
(``optimizer_step``; fp16 autocast and a grad scaler on CUDA when ``optim.amp``). Model preset,
input size, sigma, binarisation, L_pix and optimiser come from ``--config``; the weights are
random (speed does not depend on them). The batch is RefCOCO-like rows through the real
preprocessing (``benchmarks.refcoco_like``), so trees and forests are the pipeline's.

The modes are timed in turn, one step each per round, so that load from other processes hits
them alike; printed: best and median ms per step, the ratio of each mode to box-lloc (the
reference, same process, same batch; target for forest-gradcam <= 1.15), and the pseudo-label
part alone (``pseudo_labels_for`` on a forward output). Not a timed test.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from benchmarks.refcoco_like import training_batch  # noqa: E402
from gtms.config import load_config  # noqa: E402
from gtms.eval.validation import pseudo_labels_for, to_device  # noqa: E402
from gtms.model.build import build_model  # noqa: E402
from gtms.train.loop import optimizer_step  # noqa: E402
from gtms.train.optim import build_optimizer  # noqa: E402
from gtms.train.step import compute_losses  # noqa: E402

REFERENCE = "box-lloc"
TARGET = 1.15  # forest-gradcam step / box-lloc step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/synthref.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for run.py")
    parser.add_argument("--batch", type=int, default=0, help="0: train.batch_size")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds after warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a laptop worker has ray.cpus_per_worker = 1)")
    parser.add_argument("--modes", nargs="+", default=[REFERENCE, "tree", "forest-gradcam"])
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict[str, Callable[[], None]], repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each step over ``repeats`` rounds, one call of every step per round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if REFERENCE not in args.modes:
        args.modes.insert(0, REFERENCE)
    cfg = load_config(args.config, args.set)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    batch_size = args.batch or cfg.train.batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model.preset, word_len=cfg.data.word_len).to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    amp = device.type == "cuda" and cfg.optim.amp
    scaler = torch.amp.GradScaler("cuda") if amp else None
    batch = to_device(training_batch(batch_size, cfg.data.input_size,
                                     word_len=cfg.data.word_len), device)
    side = cfg.data.input_size // 4

    def losses(mode: str):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            return compute_losses(model, batch, mode=mode, sigma=cfg.pseudo.sigma,
                                  gamma=cfg.loss.gamma_max, binarize_at=cfg.pseudo.binarize_at,
                                  pixel=cfg.loss.pixel, pixel_region=cfg.loss.pixel_region)

    def train_step(mode: str) -> Callable[[], None]:
        def run() -> None:
            terms = losses(mode).terms
            optimizer_step(model, optimizer, scaler, terms["loss"], cfg.optim.grad_clip)
            float(terms["loss"].detach())  # the loop reads every term back
        return run

    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        out = model(batch["image"], batch["tokens"])

    def pseudo_only() -> None:
        pseudo_labels_for(model, out, batch, mode="forest-gradcam", sigma=cfg.pseudo.sigma,
                          binarize_at=cfg.pseudo.binarize_at)

    steps = {mode: train_step(mode) for mode in args.modes}
    steps["pseudo labels only (forest-gradcam)"] = pseudo_only
    start = time.perf_counter()
    round_robin(steps, 2, device)  # numba compile/load, allocator, Adam state
    print(f"{args.config}: preset {cfg.model.preset}, input {cfg.data.input_size} "
          f"({side}x{side} trees), batch {batch_size}, {device}, torch threads "
          f"{torch.get_num_threads()}, amp {amp}; warm-up {time.perf_counter() - start:.1f} s; "
          f"load {os.getloadavg()[0]:.2f}")
    times = round_robin(steps, args.repeats, device)
    ref = times[REFERENCE]
    print(f"\n{'step':38s} {'best ms':>9s} {'median ms':>10s} {'/ ' + REFERENCE:>14s}")
    for name, values in times.items():
        best, median = min(values), statistics.median(values)
        ratio = (f"{best / min(ref):6.3f} {median / statistics.median(ref):6.3f}"
                 if name in args.modes else "")
        print(f"{name:38s} {best:9.1f} {median:10.1f}   {ratio}")
    if "forest-gradcam" in times:
        gtms = times["forest-gradcam"]
        ratio = min(gtms) / min(ref)
        print(f"\nGTMS step / {REFERENCE} step: {ratio:.3f} (best), "
              f"{statistics.median(gtms) / statistics.median(ref):.3f} (median); target <= "
              f"{TARGET} ({'met' if ratio <= TARGET else 'NOT met'} on the best)")
    print(f"ratios: best over best, median over median; load now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
