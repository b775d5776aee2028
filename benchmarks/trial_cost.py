"""What one Table 2 trial costs on a CPU core, before and after the cheaper step.

    python -m benchmarks.trial_cost                                  # the laptop ablation
    python -m benchmarks.trial_cost --config experiments/synthref_ablation.yaml --repeats 8

A trial is ``train.epochs`` epochs of the training step over SynthRef's train refs plus a
validation pass per epoch. This times, in one process and in turn (so load from other processes
hits every variant alike), the forest-gradcam training step on one RefCOCO-like batch
(:mod:`benchmarks.refcoco_like`) in four set-ups, each a fresh copy of the same model:

- ``fp32``: float32, contiguous layout, GradCAM from the trained towers (the step before);
- ``+ channels-last``: model and images in channels-last layout (``optim.channels_last``);
- ``+ bf16``: bfloat16 autocast on the CPU as well (``optim.cpu_bf16``);
- ``+ frozen A``: GradCAM from the frozen starting towers, cached per sentence
  (``pseudo.attention_source: frozen``; every round after the first hits the cache, as every
  epoch after a sentence's first does).

It prints ms per sample (best and median round), each variant's ratio to ``fp32`` and the
trial's estimated core-minutes (train samples x epochs x step + val sentences x epochs x the
validation step, which stays float32). Not a timed test.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from benchmarks.refcoco_like import training_batch  # noqa: E402
from benchmarks.train_step import round_robin  # noqa: E402
from gtms.config import load_config, replace  # noqa: E402
from gtms.eval.validation import pseudo_labels_for  # noqa: E402
from gtms.model.build import build_model  # noqa: E402
from gtms.pseudo.attention_source import FrozenAttention  # noqa: E402
from gtms.train.loop import optimizer_step, training_autocast  # noqa: E402
from gtms.train.optim import build_optimizer  # noqa: E402
from gtms.train.step import compute_losses  # noqa: E402

# SynthRef v2 (README): train refs, and val sentences validated after every epoch.
TRAIN_REFS, VAL_SENTENCES = 1813, 771


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/synthref_ablation.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds after warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a trial's)")
    return parser.parse_args(argv)


def variant_step(cfg, model, batch, *, channels_last: bool, bf16: bool,
                 attention) -> Callable[[], None]:
    """One forest-gradcam training step of ``model`` (its own optimiser) in a set-up."""
    cfg = replace(cfg, optim={"channels_last": channels_last, "cpu_bf16": bf16})
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last))
    optimizer = build_optimizer(model, cfg.optim)
    device = torch.device("cpu")

    def run() -> None:
        with training_autocast(device, cfg, None):
            terms = compute_losses(model, batch, mode="forest-gradcam", sigma=cfg.pseudo.sigma,
                                   gamma=cfg.loss.gamma_max, binarize_at=cfg.pseudo.binarize_at,
                                   pixel=cfg.loss.pixel, pixel_region=cfg.loss.pixel_region,
                                   attention=attention).terms
        optimizer_step(model, optimizer, None, terms["loss"], cfg.optim.grad_clip)
        float(terms["loss"].detach())
    return run


def validation_pass(cfg, model, batch) -> Callable[[], None]:
    """The per-epoch validation work per batch: an eval-mode float32 forward and the pseudo
    labels it measures."""
    @torch.no_grad()
    def run() -> None:
        model.eval()
        out = model(batch["image"], batch["tokens"])
        pseudo_labels_for(model, out, batch, mode="forest-gradcam", sigma=cfg.pseudo.sigma,
                          binarize_at=cfg.pseudo.binarize_at)
        model.train()
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    torch.set_num_threads(args.threads)
    n = cfg.train.batch_size
    batch = training_batch(n, cfg.data.input_size, word_len=cfg.data.word_len)
    batch["ref_id"], batch["sent_index"] = torch.arange(n), torch.zeros(n, dtype=torch.int32)
    torch.manual_seed(0)
    base = build_model(cfg.model.preset, word_len=cfg.data.word_len).train()
    frozen = FrozenAttention(copy.deepcopy(base.backbone))
    steps = {
        "fp32": variant_step(cfg, copy.deepcopy(base), batch, channels_last=False, bf16=False,
                             attention=None),
        "+ channels-last": variant_step(cfg, copy.deepcopy(base), batch, channels_last=True,
                                        bf16=False, attention=None),
        "+ bf16": variant_step(cfg, copy.deepcopy(base), batch, channels_last=True, bf16=True,
                               attention=None),
        "+ frozen A (cached)": variant_step(cfg, copy.deepcopy(base), batch,
                                            channels_last=True, bf16=True, attention=frozen),
        "validation (fp32)": validation_pass(cfg, copy.deepcopy(base), batch),
    }
    round_robin(steps, 2, torch.device("cpu"))   # warm-up: allocator, oneDNN, numba, cache
    times = round_robin(steps, args.repeats, torch.device("cpu"))
    val_ms = statistics.median(times.pop("validation (fp32)")) / n
    reference = statistics.median(times["fp32"])
    print(f"{args.config}: preset {cfg.model.preset}, input {cfg.data.input_size}, batch {n}, "
          f"torch threads {torch.get_num_threads()}, {cfg.train.epochs} epochs; validation "
          f"{val_ms:.1f} ms per sentence; load {os.getloadavg()[0]:.2f}\n")
    print(f"{'training step':22s} {'best ms/sample':>15s} {'median':>8s} {'/ fp32':>7s} "
          f"{'trial core-min':>15s}")
    for name, values in times.items():
        per_sample = statistics.median(values) / n
        trial = cfg.train.epochs * (TRAIN_REFS * per_sample + VAL_SENTENCES * val_ms) / 60e3
        print(f"{name:22s} {min(values) / n:15.1f} {per_sample:8.1f} "
              f"{statistics.median(values) / reference:7.3f} {trial:15.1f}")
    print("\neach variant adds to the one above; ratios: median over median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
