"""Input-pipeline throughput: per-stage cost in one process, then the real Ray Data pipeline.

    python -m benchmarks.pipeline [--root data/synthref] [--rows 400] [--sizes 128 416]

Prints, at each input size (default the tiny preset's 128 and the paper's 416):
* per-stage ms per ref in this process (decode, letterbox (uint8), tokenise, tree+forest);
* samples/s through Ray Data with 1 and 2 preprocessing actors (training spec of
  ``forest-gradcam``, trees and forests included: what the actors deliver to a trainer, no
  model), and the in-process rate as the reference ratio (same machine, same run), with the
  peak bytes the object store held while streaming;
* what the trainer consumes: samples/s of the tiny training step (forest-gradcam, batch 16).

``--root`` may be any prepared data root (e.g. ``benchmarks.refcoco_scale``'s, prepared):
SynthRef is generated only for the default root.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gtms.config import RayConfig
from gtms.data.pipeline import PoolSpec, build_dataset, spec_for
from gtms.data.reading import iter_shard_rows
from gtms.data.tokenizer import ClipTokenizer
from gtms.data.transforms import Letterbox, decode_image, validate_box
from gtms.pseudo import build_grid_tree, structural_forest


def stage_costs(rows, size: int, tokenizer: ClipTokenizer) -> dict[str, float]:
    build_grid_tree(np.random.rand(8, 8, 3).astype(np.float32))  # numba compile outside timing
    totals = dict.fromkeys(("decode", "letterbox", "tokenise", "tree+forest"), 0.0)
    for row in rows:
        t0 = time.perf_counter()
        image = decode_image(row["image"])
        t1 = time.perf_counter()
        lb = Letterbox(int(row["height"]), int(row["width"]), size)
        pixels = lb.apply_image_uint8(image)
        np.ascontiguousarray(pixels.transpose(2, 0, 1))
        img01 = pixels.astype(np.float32) / np.float32(255.0)
        box = lb.box_at_stride(validate_box(row["box_xywh"], lb.orig_h, lb.orig_w), 4)
        t2 = time.perf_counter()
        tokenizer([str(row["sentences"][0])])
        t3 = time.perf_counter()
        tree = build_grid_tree(lb.guide_image(img01, 4))
        structural_forest(tree.parent, box.reshape(-1) > 0)
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
    return {k: 1000 * v / len(rows) for k, v in totals.items()}


def object_store_used() -> int:
    """Bytes the local object store holds now (Ray's memory summary)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def ray_rate(root: str, size: int, actors: int, rows: int) -> tuple[float, float, int]:
    """(wall s, steady samples/s, peak object-store bytes) of streaming ``rows`` train refs."""
    spec = spec_for("train", input_size=size, word_len=17, mode="forest-gradcam", seed=0)
    ds = build_dataset(root, "train", spec, PoolSpec(actors, 0, 1.0, 16), limit=rows)
    start, peak = time.perf_counter(), 0
    n, first, last_poll = 0, None, 0.0
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        if first is None:  # steady state: after the actors started and the first batch came
            first = time.perf_counter()
        else:
            n += len(batch["ref_id"])
        if time.perf_counter() - last_poll > 0.5:
            peak, last_poll = max(peak, object_store_used()), time.perf_counter()
    return time.perf_counter() - start, n / (time.perf_counter() - first), peak


def trainer_rate(size: int, batch: int = 16, steps: int = 5) -> float:
    from gtms.model.build import build_model
    from gtms.train.step import compute_losses

    torch.set_num_threads(1)
    model = build_model("tiny")
    cells = size // 4
    trees = [build_grid_tree(np.random.rand(cells, cells, 3).astype(np.float32))
             for _ in range(batch)]
    box = torch.zeros(batch, cells, cells)
    box[:, cells // 4: 3 * cells // 4, cells // 4: 3 * cells // 4] = 1
    tokens = torch.zeros(batch, 17, dtype=torch.long)
    tokens[:, :3] = torch.tensor([49406, 320, 49407])
    data = {"image": torch.randn(batch, 3, size, size), "tokens": tokens, "box": box,
            "parent": torch.from_numpy(np.stack([t.parent for t in trees])),
            "order": torch.from_numpy(np.stack([t.order for t in trees])),
            "dist": torch.from_numpy(np.stack([t.dist for t in trees])),
            "forest": torch.from_numpy(np.stack([structural_forest(
                t.parent, box[i].numpy().reshape(-1) > 0) for i, t in enumerate(trees)]))}
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = compute_losses(model, data, mode="forest-gradcam", sigma=0.02, gamma=0.5)
        optimizer.zero_grad()
        out.terms["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/synthref")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 416])
    args = parser.parse_args()
    from gtms.data.synthref import ensure_synthref
    from gtms.runtime import init_ray

    if args.root == parser.get_default("root"):
        ensure_synthref(args.root)
    tokenizer = ClipTokenizer()
    rows = list(iter_shard_rows(args.root, "train", limit=args.rows))
    init_ray(RayConfig(num_workers=0, preprocess_actors=2))
    for size in args.sizes:
        stages = stage_costs(rows[:100], size, tokenizer)
        total = sum(stages.values())
        print(f"\ninput {size}: per-stage ms/ref (one process, one core): "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + f"; total {total:.2f}"
              f" -> {1000 / total:.0f} refs/s")
        for actors in (1, 2):
            wall, rate, peak = ray_rate(args.root, size, actors, args.rows)
            print(f"  Ray Data, {actors} actor(s): {rate:.0f} samples/s steady state "
                  f"(ratio to in-process {rate / (1000 / total):.2f}); {args.rows} refs in "
                  f"{wall:.1f} s including actor start-up; object store peak "
                  f"{peak / 2**20:.0f} MB")
    consume = trainer_rate(128)
    print(f"\ntrainer consumption (tiny, 128, forest-gradcam, batch 16, 1 thread): "
          f"{consume:.0f} samples/s per worker, ~{2 * consume:.0f} samples/s for 2 workers")


if __name__ == "__main__":
    main()
