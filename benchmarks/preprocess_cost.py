"""Per-ref preprocessing cost at RefCOCO scale, and the CPU cores per GPU it asks for.

    python -m benchmarks.preprocess_cost                      # 416 px, 40 rows, rn50 FLOPs
    python -m benchmarks.preprocess_cost --rows 100 --tflops 20 40 80 --case rn101@416

Times :func:`gtms.data.pipeline.preprocess_ref`, exactly what a preprocessing actor runs per row,
on RefCOCO-like rows (640 x 480 JPEG, 3 sentences; ``benchmarks.refcoco_like``), one thread:

* train spec of ``forest-gradcam``: decode, letterbox (uint8: the model applies mean/std on its
  device), box raster, every sentence tokenised, MST + BFS of the 104 x 104 guide image,
  structural forest: one row per ref;
* val spec (in-training validation): the same plus the mask (RLE decode, stride-4 raster) and the
  evaluation metadata, one row per sentence;

then each stage on its own, and Ray's share of a row: stacking the actor's output batch and
serialising it (pickle protocol 5, as the object store copies it). Best and median over
``--repeats`` passes over the rows (on a shared machine the best is the figure to compare).

From these, the plan: a GPU that computes ``T`` TFLOP/s trains ``T / (fwd+bwd+GradCAM FLOPs)``
samples/s and validates ``T / (fwd+GradCAM FLOPs)`` samples/s (FLOPs per sample counted as in
``benchmarks.model_flops``), and its actors must preprocess that many refs (training) or
sentences (validation, streamed: RefCOCO's val split does not fit ``data.memory_budget_mb``)
per second. Cores = samples/s x seconds per sample; the table prints them for each ``--tflops``
and compares with the plan in ``gtms.runtime.CPUS_PER_GPU``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import pickle  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.pseudo_labels import time_ms  # noqa: E402
from benchmarks.refcoco_like import refcoco_like_row  # noqa: E402
from gtms.data.pipeline import STRIDE, preprocess_ref, spec_for, stack_samples  # noqa: E402
from gtms.data.tokenizer import ClipTokenizer  # noqa: E402
from gtms.data.transforms import (  # noqa: E402
    Letterbox,
    decode_image,
    rle_decode,
    validate_box,
)
from gtms.pseudo import build_grid_tree, structural_forest  # noqa: E402
from gtms.runtime import CPUS_PER_GPU  # noqa: E402


def timed_ms(fn: Callable[[dict], object], rows: list[dict], repeats: int) -> tuple[float, float]:
    """Best and median over ``repeats`` passes of the mean ms per row of ``fn(row)`` (one warm-up
    pass first: numba compile/load, tokenizer caches)."""
    timing = time_ms(lambda: [fn(row) for row in rows], repeats, per=len(rows))
    return timing.best, timing.median


def stage_functions(size: int, tokenizer: ClipTokenizer, word_len: int) -> dict[str, Callable]:
    """Each stage of preprocess_ref on its own (inputs prepared outside the timed call)."""
    prepared: dict[int, dict] = {}

    def prep(row: dict) -> dict:
        key = row["ref_id"]
        if key not in prepared:
            image = decode_image(row["image"])
            letterbox = Letterbox(row["height"], row["width"], size)
            pixels = letterbox.apply_image_uint8(image)
            image01 = pixels.astype(np.float32) / np.float32(255.0)
            guide = letterbox.guide_image(image01, STRIDE)
            box = letterbox.box_at_stride(validate_box(row["box_xywh"], *image.shape[:2]), STRIDE)
            prepared[key] = dict(image=image, letterbox=letterbox, pixels=pixels,
                                 image01=image01, guide=guide,
                                 box=box, tree=build_grid_tree(guide))
        return prepared[key]

    def letterbox_stage(row: dict) -> None:
        p = prep(row)
        letterbox = Letterbox(row["height"], row["width"], size)
        np.ascontiguousarray(letterbox.apply_image_uint8(p["image"]).transpose(2, 0, 1))
        letterbox.box_at_stride(validate_box(row["box_xywh"], *p["image"].shape[:2]), STRIDE)

    def float_stage(row: dict) -> None:
        prep(row)["pixels"].astype(np.float32) / np.float32(255.0)

    def mask_stage(row: dict) -> None:
        p = prep(row)
        mask = rle_decode(row["mask_rle_counts"], row["height"], row["width"])
        p["letterbox"].mask_at_stride(mask, STRIDE)

    return {
        "decode JPEG": lambda row: decode_image(row["image"]),
        "letterbox (uint8) + box": letterbox_stage,
        "uint8 -> [0, 1] float (guide input)": float_stage,
        "tokenise 3 sentences": lambda row: [tokenizer.encode(s, word_len)
                                             for s in row["sentences"]],
        "guide image (stride 4)": lambda row: prep(row)["letterbox"].guide_image(
            prep(row)["image01"], STRIDE),
        "MST + BFS (104x104)": lambda row: build_grid_tree(prep(row)["guide"]),
        "forest": lambda row: structural_forest(prep(row)["tree"].parent,
                                                prep(row)["box"].reshape(-1) > 0),
        "mask RLE decode + raster (val)": mask_stage,
    }


def transfer_ms(rows: list[dict], spec, tokenizer: ClipTokenizer, repeats: int) -> float:
    """Stacking one actor call's samples and pickling them, per sample (best of repeats)."""
    samples = [s for row in rows for s in preprocess_ref(row, spec, tokenizer)]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pickle.dumps(stack_samples(samples, spec), protocol=5)
        best = min(best, (time.perf_counter() - start) * 1e3 / len(samples))
    return best


def model_gflops(case: str) -> tuple[float, float]:
    """(train, val) GFLOP per sample of ``case``: fwd+bwd+GradCAM and fwd+GradCAM."""
    from benchmarks.model_flops import count_case

    counted = count_case(case)
    return (counted["forward_backward"] + counted["gradcam"],
            counted["forward"] + counted["gradcam"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=416, help="input size (trees at size/4)")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", default="rn50@416", help="model whose FLOPs set GPU rates")
    parser.add_argument("--tflops", type=float, nargs="+", default=[20.0, 40.0, 80.0],
                        help="sustained TFLOP/s per GPU to plan for (cluster/README.md "
                             "assumes 20 for an A10G or L4 with fp16 autocast)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    rows = [refcoco_like_row(i, rng) for i in range(args.rows)]
    tokenizer = ClipTokenizer()
    sentences = statistics.mean(len(row["sentences"]) for row in rows)
    train = spec_for("train", input_size=args.size, word_len=17, mode="forest-gradcam", seed=0)
    val = spec_for("val", input_size=args.size, word_len=17, mode="forest-gradcam", seed=0)
    print(f"{args.rows} RefCOCO-like rows: {rows[0]['width']}x{rows[0]['height']} JPEG, "
          f"mean {statistics.mean(len(r['image']) for r in rows) / 1e3:.0f} kB, "
          f"{sentences:.0f} sentences; input {args.size}, trees "
          f"{args.size // STRIDE}x{args.size // STRIDE}; one thread; load "
          f"{os.getloadavg()[0]:.2f}")

    per_row = {name: timed_ms(lambda row, spec=spec: preprocess_ref(row, spec, tokenizer),
                              rows, args.repeats) for name, spec in (("train", train),
                                                                     ("val", val))}
    moved = {"train": transfer_ms(rows[:32], train, tokenizer, args.repeats),
             "val": transfer_ms(rows[:11], val, tokenizer, args.repeats)}
    train_ms = per_row["train"][0] + moved["train"]
    val_ms = per_row["val"][0] / sentences + moved["val"]
    print(f"\n{'preprocess_ref':32s} {'best ms':>8s} {'median':>8s}")
    print(f"  {'train spec, per ref':30s} {per_row['train'][0]:8.2f} {per_row['train'][1]:8.2f}")
    print(f"  {'val spec, per ref':30s} {per_row['val'][0]:8.2f} {per_row['val'][1]:8.2f}")
    print(f"  {'val spec, per sentence':30s} {per_row['val'][0] / sentences:8.2f} "
          f"{per_row['val'][1] / sentences:8.2f}")
    print(f"  stack + pickle per sample: train {moved['train']:.2f} ms, val {moved['val']:.2f} ms")
    print(f"\nstages, per ref ({'best ms':>7s} {'median':>7s})")
    for name, fn in stage_functions(args.size, tokenizer, 17).items():
        best, median = timed_ms(fn, rows, args.repeats)
        print(f"  {name:32s} {best:7.2f} {median:7.2f}")

    train_gflop, val_gflop = model_gflops(args.case)
    print(f"\nper sample (best, with stack + pickle): train ref {train_ms:.1f} ms, val sentence "
          f"{val_ms:.1f} ms; {args.case}: train {train_gflop:.1f} GFLOP (fwd+bwd+GradCAM), "
          f"val {val_gflop:.1f} GFLOP (fwd+GradCAM)")
    print(f"\n{'GPU TFLOP/s':>11s} {'train/s':>8s} {'actor cores':>11s} {'val/s':>7s} "
          f"{'actor cores':>11s}")
    for tflops in args.tflops:
        train_rate, val_rate = tflops * 1e3 / train_gflop, tflops * 1e3 / val_gflop
        print(f"{tflops:11.0f} {train_rate:8.0f} {train_rate * train_ms / 1e3:11.2f} "
              f"{val_rate:7.0f} {val_rate * val_ms / 1e3:11.2f}")
    plan = CPUS_PER_GPU
    print(f"\nplan per GPU (gtms.runtime.CPUS_PER_GPU): {plan.trainer} trainer CPUs, "
          f"{plan.actors_min}-{plan.actors_max} actor CPUs; the minimum keeps up with training "
          f"up to {plan.actors_min * 1e3 / train_ms * train_gflop / 1e3:.0f} TFLOP/s and "
          f"validation up to {plan.actors_min * 1e3 / val_ms * val_gflop / 1e3:.0f} TFLOP/s, "
          f"the maximum up to {plan.actors_max * 1e3 / train_ms * train_gflop / 1e3:.0f} and "
          f"{plan.actors_max * 1e3 / val_ms * val_gflop / 1e3:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
