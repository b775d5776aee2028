"""CPU latency per image + sentence pair: PyTorch against ONNX Runtime, on the exported model.

    python -m benchmarks.export_latency [--repeats 10] [--cases tiny@160 rn50@416]

For each case (preset @ input size; random weights: latency does not depend on them) the model
from image and tokens to the mask logits (:class:`gtms.infer.export.MaskLogits`) is exported
to ONNX in a temporary folder, then one pair at a time is run through PyTorch and through ONNX
Runtime (CPU, default threads), best and median ms over ``--repeats`` after a warm-up, and the
largest difference between their logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gtms.infer.export import ExportedModel, MaskLogits, _export_onnx, example_inputs
from gtms.model.build import build_model


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def run_case(case: str, repeats: int, folder: Path) -> None:
    preset, size = case.split("@")
    model = MaskLogits(build_model(preset, word_len=17).eval())
    out = folder / f"{preset}-{size}.onnx"
    with torch.no_grad():
        _export_onnx(model, example_inputs(int(size), 17), out)
    (folder / f"{out.name}.json").write_text(json.dumps(
        {"format": "onnx", "input_size": int(size), "word_len": 17, "threshold": 0.35,
         "max_image_pixels": 0}))
    exported = ExportedModel(out)
    image, tokens = example_inputs(int(size), 17, batch=1, seed=1)
    with torch.no_grad():
        torch_ms = timed(lambda: model(image, tokens), repeats)
        diff = float((model(image, tokens) - exported(image, tokens).logits).abs().max())
    onnx_ms = timed(lambda: exported(image, tokens), repeats)
    print(f"{case:>10s}  PyTorch {torch_ms[0]:8.1f} {torch_ms[1]:8.1f}   ONNX Runtime "
          f"{onnx_ms[0]:8.1f} {onnx_ms[1]:8.1f}   ratio {onnx_ms[0] / torch_ms[0]:5.2f}   "
          f"max |diff| {diff:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", nargs="+", default=["tiny@160", "rn50@416"])
    args = parser.parse_args(argv)
    print(f"ms per pair, best and median of {args.repeats}; torch threads "
          f"{torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            run_case(case, args.repeats, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
