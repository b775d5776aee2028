"""CRIS speed on this machine: forward and forward+backward time per sample, parameter counts.

Run from the repository root:

    python -m benchmarks.model_speed                      # tiny@128, rn50@416, rn101@416, batch 2
    python -m benchmarks.model_speed --cases tiny@128 --repeats 20

Random weights, CPU unless --device says otherwise. "forward" is inference (eval mode, no
gradients); "forward+backward" is a training step's model part (train mode, backward of the
logits' mean; no optimiser step). Times are the best of --repeats runs after one warm-up (the
least disturbed by other processes); the 1-minute load average is printed before and after, since
a busy machine inflates every figure.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from gtms.model import build_model, count_parameters

DEFAULT_CASES = ("tiny@128", "rn50@416", "rn101@416")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="PRESET@SIZE")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def time_ms(fn: Callable[[], None], *, repeats: int, device: torch.device) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls in milliseconds, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def bench_case(case: str, *, batch: int, repeats: int, device: torch.device) -> dict:
    preset, size = case.split("@")
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    image = torch.randn(batch, 3, int(size), int(size), device=device)
    tokens = torch.zeros(batch, model.arch.word_len, dtype=torch.int64, device=device)
    tokens[:, :6] = torch.tensor([49406, 1823, 8687, 525, 518, 49407])

    def forward() -> None:
        with torch.no_grad():
            model.eval()(image, tokens)

    def forward_backward() -> None:
        model.train().zero_grad(set_to_none=True)
        model(image, tokens).logits.mean().backward()

    return dict(
        case=case,
        params=count_parameters(model),
        forward=time_ms(forward, repeats=repeats, device=device) / batch,
        forward_backward=time_ms(forward_backward, repeats=repeats, device=device) / batch,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, best of {args.repeats}, load {os.getloadavg()[0]:.2f}")
    print(f"{'case':<12}{'params':>14}{'fwd ms/sample':>16}{'fwd+bwd ms/sample':>20}")
    for case in args.cases:
        r = bench_case(case, batch=args.batch, repeats=args.repeats, device=device)
        print(f"{r['case']:<12}{r['params']:>14,}{r['forward']:>16.1f}{r['forward_backward']:>20.1f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
