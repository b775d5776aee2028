"""SynthRef generation and sharding throughput, and how far masks are from their boxes.

Run from the repository root:

    python -m benchmarks.datasets                       # default size (800 images), standard
    python -m benchmarks.datasets --num-images 200 --difficulty hard

Prints refs/s for generation (images, instances.json, refs pickle) and for sharding (reading the
refer files back, checking every image, writing Parquet), and the mean mask/box area ratio
(1.0 would mean the box is the mask).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gtms.data.records import SkipLog
from gtms.data.refer import load_refer
from gtms.data.shards import build_shards
from gtms.data.synthref import (
    DEFAULT_DIFFICULTY,
    DEFAULT_NUM_IMAGES,
    SynthRefSettings,
    generate_synthref,
    refer_source,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", default=DEFAULT_DIFFICULTY,
                        choices=("easy", "standard", "hard"))
    args = parser.parse_args(argv)
    settings = SynthRefSettings(num_images=args.num_images, seed=args.seed,
                                difficulty=args.difficulty)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        generated = generate_synthref(out, settings, progress=False)
        gen_s = time.perf_counter() - start
        refs = sum(generated.refs.values())
        start = time.perf_counter()
        report = build_shards(refer_source(out), out, generator=settings.to_dict(),
                              progress=False)
        shard_s = time.perf_counter() - start
        records = load_refer(refer_source(out), SkipLog(strict=True))
        ratios = [r.decode_mask().sum() / (r.box_xywh[2] * r.box_xywh[3]) for r in records]
        size_mb = sum(p.stat().st_size for p in (out / "shards").rglob("*.parquet")) / 1e6
    print(f"SynthRef {settings.difficulty}, {settings.num_images} images, {refs} refs, "
          f"{generated.sentences} sentences, splits {generated.refs}")
    print(f"generation: {gen_s:.2f} s, {refs / gen_s:.0f} refs/s "
          f"({settings.num_images / gen_s:.0f} images/s)")
    print(f"sharding:   {shard_s:.2f} s, {refs / shard_s:.0f} refs/s "
          f"({len(report.manifest['shards'])} files, {size_mb:.1f} MB)")
    print(f"mean mask/box area ratio over refs: {np.mean(ratios):.3f} "
          f"(median {np.median(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
