"""CRIS compute per sample in FLOPs (not time): what cluster/README.md's GPU-hour estimate uses.

Run from the repository root:

    python -m benchmarks.model_flops                      # rn50@416, rn101@416
    python -m benchmarks.model_flops --cases tiny@160

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications, attention
and convolutions, 2 FLOPs per multiply-add; element-wise work is not counted) on PyTorch's
``meta`` device: shapes only, nothing is computed, so it takes seconds on any machine (on real
CPU tensors the fused attention kernels of inference escape the counter). Batch 2 (batch norm
cannot train on one sample), divided by the batch. "forward" is
inference; "forward+backward" is a training step's model part (train mode, backward of the
logits' mean, every parameter trainable as in the paper configs); "GradCAM" is the extra pass of
the GTMS pseudo label through CLIP's attention pool (``gtms.pseudo.gradcam``). The tree filter
(O(N) on the stride-4 grid) and the losses are negligible next to these.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from gtms.model import build_model, count_parameters
from gtms.pseudo.gradcam import gradcam_map

DEFAULT_CASES = ("rn50@416", "rn101@416")
BATCH = 2


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_case(case: str) -> dict:
    preset, size = case.split("@")
    with torch.device("meta"):
        model = build_model(preset)
        image = torch.zeros(BATCH, 3, int(size), int(size))
        tokens = torch.zeros(BATCH, model.arch.word_len, dtype=torch.int64)

    def forward() -> None:
        with torch.no_grad():
            model.eval()(image, tokens)

    def forward_backward() -> None:
        model.train()(image, tokens).logits.mean().backward()

    out = model.train()(image, tokens)
    stride4 = tuple(s // 4 for s in image.shape[-2:])

    def gradcam() -> None:
        gradcam_map(out.layer4, out.sentence, model.global_image_embedding, stride4)

    return dict(case=case, params=count_parameters(model),
                forward=flops(forward) / BATCH / 1e9,
                forward_backward=flops(forward_backward) / BATCH / 1e9,
                gradcam=flops(gradcam) / BATCH / 1e9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="PRESET@SIZE")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}; GFLOP per sample (1 GFLOP = 1e9 FLOPs)")
    print(f"{'case':<12}{'params':>14}{'forward':>10}{'fwd+bwd':>10}{'GradCAM':>10}")
    for case in args.cases:
        r = count_case(case)
        print(f"{r['case']:<12}{r['params']:>14,}{r['forward']:>10.1f}"
              f"{r['forward_backward']:>10.1f}{r['gradcam']:>10.1f}")


if __name__ == "__main__":
    main()
