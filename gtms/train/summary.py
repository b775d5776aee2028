"""The end of a training run: its summary (best and latest checkpoint, the final and best
epochs' metrics), ``summary.json`` with the commands to go on with, and what ``run.py train``
prints last."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from gtms import storage
from gtms.backend import RunResult, retention
from gtms.config import Config
from gtms.data.reading import iter_shard_rows
from gtms.eval.metrics import percent
from gtms.tracking import where_to_look


def summarise(result: RunResult) -> dict[str, Any]:
    """The summary of a finished run from its kept checkpoints: the best by
    :func:`gtms.backend.retention.best` (the latest when no epoch was validated)."""
    run_dir, final, latest = result.run_dir, result.metrics, result.latest
    checkpoints = result.checkpoints
    best = retention.best([metrics for _, metrics in checkpoints])
    if best is None:  # no epoch was validated: the latest stands in
        return {"run_dir": run_dir, "final": final, "best": final, "best_checkpoint": latest,
                "latest_checkpoint": latest}
    where = next(where for where, metrics in checkpoints if metrics is best)
    return {"run_dir": run_dir, "final": final, "best": best, "best_checkpoint": where,
            "latest_checkpoint": latest}


def write_summary(run_dir: str, cfg: Config, root: str, summary: dict[str, Any]) -> None:
    """Add the next-step commands to ``summary`` and write it to ``<run>/summary.json``."""
    folder = storage.RunFolder(run_dir)
    summary["next_steps"] = next_steps(cfg, root, summary.get("best_checkpoint"), folder.path)
    summary["trackers"] = where_to_look(cfg, run_dir)
    (folder.path / "summary.json").write_text(json.dumps(summary, indent=2))
    folder.sync()


def _run_py() -> str:
    """``run.py`` as the printed commands name it: relative to the working directory when it
    lies below it, else absolute."""
    entry = Path(__file__).resolve().parents[2] / "run.py"
    try:
        return str(entry.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(entry)


def example_image(root: str, split: str, folder: Path) -> tuple[Path, str] | None:
    """Copy the image of the first usable ref of ``split`` into ``folder`` (as
    ``example_ref<id>.<ext>``) for the printed predict command; returns it and its first
    sentence, or None when no ref of the first few can be used."""
    import io

    from PIL import Image, UnidentifiedImageError

    for row in iter_shard_rows(root, split, limit=16):
        data = bytes(row["image"])
        sentences = [str(s).strip() for s in row["sentences"] if str(s).strip()]
        try:
            kind = Image.open(io.BytesIO(data)).format
        except (UnidentifiedImageError, OSError):
            continue
        if sentences and kind:
            suffix = "jpg" if kind == "JPEG" else kind.lower()
            path = folder / f"example_ref{int(row['ref_id'])}.{suffix}"
            path.write_bytes(data)
            return path, sentences[0]
    return None


def next_steps(cfg: Config, root: str, checkpoint: str | None,
               folder: Path) -> list[dict[str, str]]:
    """What to do with the trained model: ``what`` and a ``command`` that runs as printed (from
    the working directory of the training run; every word shell-quoted)."""
    if not checkpoint:
        return []
    run, ckpt = ["python", _run_py()], ["--checkpoint", str(checkpoint)]
    steps = [{"what": f"evaluate the best checkpoint on {', '.join(cfg.data.eval_splits)} "
                      "(training validated on " + cfg.data.val_split + " only)",
              "command": shlex.join([*run, "eval", *ckpt, "--splits",
                                     ",".join(cfg.data.eval_splits)])}]
    example = example_image(root, cfg.data.val_split, folder)
    if example is not None:
        image, text = example
        out = [] if storage.is_uri(checkpoint) else \
            ["--out", str(Path(checkpoint) / "predictions")]
        steps.append({"what": f"segment what a sentence refers to in an image (here one of "
                              f"{cfg.data.val_split}; use your own)",
                      "command": shlex.join([*run, "predict", *ckpt, "--image", str(image),
                                             "--text", text, *out])})
    steps.append({"what": f"draw GTMS panels (forest, GradCAM, W, P^, prediction) for "
                          f"{cfg.data.val_split} samples",
                  "command": shlex.join([*run, "visualize", *ckpt, "--split",
                                         cfg.data.val_split, "--n", "8"])})
    return steps


def print_summary(summary: dict[str, Any]) -> None:
    """The end of ``run.py train``: where the run is, its val numbers (IoU in percent) and the
    commands to go on with."""
    best, final = summary.get("best") or {}, summary.get("final") or {}
    print("\n=== training finished ===")
    print(f"run folder:          {summary['run_dir']}")
    print(f"wall time:           {summary.get('wall_time_s', 0):.0f} s")
    if final:
        scores = f"  val mean IoU {percent(final['val_mean_iou'])}  overall IoU " \
            f"{percent(final['val_overall_iou'])}" if retention.validated(final) else ""
        print(f"final epoch:         {final['epoch']}{scores}")
    if retention.validated(best):
        print(f"best epoch:          {best['epoch']}  val mean IoU "
              f"{percent(best['val_mean_iou'])}")
    print(f"best checkpoint:     {summary.get('best_checkpoint')}")
    print(f"latest checkpoint:   {summary.get('latest_checkpoint')}")
    for name, where in summary.get("trackers", {}).items():
        print(f"{name + ':':<21}{where}")
    if summary.get("next_steps"):
        print("\nnext steps:")
        for step in summary["next_steps"]:
            print(f"  {step['what']}:\n    {step['command']}")
    sys.stdout.flush()
