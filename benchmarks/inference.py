"""Inference throughput: images/s of CRIS forward passes and of the whole ``run.py predict`` path.

    python -m benchmarks.inference                       # tiny and rn50 at 416, batch 1 and 8, CPU
    python -m benchmarks.inference --presets tiny --batches 1 4 16 --repeats 5

Random weights (``build_model``), eval mode. "forward" is the model alone under
``torch.no_grad()`` on an already prepared batch. "end to end" (tiny by default) is what
``run.py predict`` does per batch after reading the files: decode JPEG bytes (640x480, COCO's
usual size) -> letterbox + normalise + tokenise -> forward -> sigmoid -> inverse letterbox to
640x480 -> threshold; the stage costs per image are printed beside it. Times are the best of
--repeats runs after one warm-up; the 1-minute load average is printed before and after, since a
busy machine inflates every figure.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np
import torch

from benchmarks.model_speed import time_ms
from gtms.data.transforms import decode_image
from gtms.infer.predict import Predictor
from gtms.model import build_model

SENTENCES = ("the red ring on the left", "the smaller blue star", "bottom crescent",
             "the cross next to the white blob")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "rn50"])
    parser.add_argument("--end-to-end", nargs="*", default=["tiny"], metavar="PRESET",
                        help="presets to time end to end (default: tiny)")
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def sample_jpegs(n: int, height: int = 480, width: int = 640) -> list[bytes]:
    """``n`` different photo-like JPEGs (smooth colour fields with shapes)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.circle(img, centre, int(rng.integers(20, 120)), colour, -1)
        ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(data.tobytes())
    return out


def forward_rate(model, predictor: Predictor, batch: int, *, repeats: int,
                 device: torch.device) -> float:
    """Images/s of the model alone on a prepared batch."""
    jpegs = sample_jpegs(batch)
    pairs = [predictor.prepare(decode_image(b), SENTENCES[i % len(SENTENCES)])
             for i, b in enumerate(jpegs)]
    images = torch.from_numpy(np.stack([p.image for p in pairs])).to(device)
    tokens = torch.from_numpy(np.stack([p.tokens for p in pairs])).to(device)

    def forward() -> None:
        with torch.no_grad():
            model(images, tokens)

    return batch / (time_ms(forward, repeats=repeats, device=device) / 1000)


def end_to_end(predictor: Predictor, batch: int, *, repeats: int,
               device: torch.device) -> dict[str, float]:
    """Images/s of decode + prepare + forward + invert + threshold, and per-stage ms/image."""
    jpegs = sample_jpegs(batch)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]

    def whole() -> None:
        pairs = [predictor.prepare(decode_image(b), t) for b, t in zip(jpegs, texts)]
        predictor.masks(pairs)

    rate = batch / (time_ms(whole, repeats=repeats, device=device) / 1000)
    images = [decode_image(b) for b in jpegs]
    pairs = [predictor.prepare(img, t) for img, t in zip(images, texts)]
    side = predictor.input_size // 4
    probs = np.random.default_rng(0).random((batch, side, side), dtype=np.float32)
    stages = {
        "decode": lambda: [decode_image(b) for b in jpegs],
        "prepare": lambda: [predictor.prepare(img, t) for img, t in zip(images, texts)],
        "forward": lambda: predictor.model(
            torch.from_numpy(np.stack([p.image for p in pairs])).to(device),
            torch.from_numpy(np.stack([p.tokens for p in pairs])).to(device)),
        "invert": lambda: [p.letterbox.invert_prediction(q) > 0.35 for p, q in zip(pairs, probs)],
    }
    out = {"images_per_s": rate}
    with torch.no_grad():
        for name, fn in stages.items():
            out[f"{name}_ms"] = time_ms(fn, repeats=repeats, device=device) / batch
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"input {args.size}, best of {args.repeats}, load {os.getloadavg()[0]:.2f}")
    print(f"{'preset':<8}{'batch':>6}{'forward img/s':>15}{'end-to-end img/s':>18}"
          f"{'decode':>9}{'prepare':>9}{'forward':>9}{'invert':>9}  (ms/image)")
    for preset in args.presets:
        torch.manual_seed(0)
        model = build_model(preset).to(device).eval()
        predictor = Predictor(model, input_size=args.size, word_len=model.arch.word_len,
                              threshold=0.35, device=device)
        for batch in args.batches:
            start = time.perf_counter()
            fwd = forward_rate(model, predictor, batch, repeats=args.repeats, device=device)
            line = f"{preset:<8}{batch:>6}{fwd:>15.2f}"
            if preset in args.end_to_end:
                e2e = end_to_end(predictor, batch, repeats=args.repeats, device=device)
                line += (f"{e2e['images_per_s']:>18.2f}{e2e['decode_ms']:>9.1f}"
                         f"{e2e['prepare_ms']:>9.1f}{e2e['forward_ms']:>9.1f}"
                         f"{e2e['invert_ms']:>9.1f}")
            print(f"{line}   [{time.perf_counter() - start:.0f} s]", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
