"""Driver of ``run.py pretrain``: pairs, the loop (Ray Train or one process), export, report.

Output folder (``--out``, or the cache ``<data.root>/synthclip/<key>/`` that ``train`` uses)::

    clip.pt        OpenAI-layout CLIP state dict: load it with ``model.clip_weights``
    report.json    settings, data counts, per-epoch loss, metrics before and after, wall time
    pairs.npz      the preprocessed pairs the workers read (removed at the end)

The cache key hashes everything the weights depend on (architecture, input size, the pretrain
section, the dataset's manifest), so a changed setting pretrains again and never reuses stale
weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from gtms.backend import Backend
from gtms.config import Config
from gtms.console import phase, say
from gtms.data.shards import read_manifest, shards_dir
from gtms.errors import UserError
from gtms.model.build import CLIP_STRIDE, CRISArch, preset_arch
from gtms.model.checkpoint import read_backbone_checkpoint, save_clip_weights
from gtms.pretrain.data import build_pairs, build_probe
from gtms.pretrain.loop import (
    WEIGHTS_NAME,
    build_synthclip,
    pretrain_loop,
    probe_metrics,
    save_pairs,
)
from gtms.storage import folder_lock, is_uri

REPORT_NAME = "report.json"


class PretrainError(UserError):
    """Pretraining cannot start (no cache folder for remote data, nothing to pair)."""



def pretrain_arch(cfg: Config) -> CRISArch:
    """The preset's architecture, with CLIP's pretraining resolution set to the input size
    (the attention pool's grid then matches the training input exactly)."""
    arch = preset_arch(cfg.model.preset, word_len=cfg.data.word_len)
    if cfg.data.input_size % CLIP_STRIDE == 0:
        arch = dataclasses.replace(arch, image_resolution=cfg.data.input_size)
    return arch


def cache_key(cfg: Config, data_root: str | Path) -> str:
    manifest = read_manifest(shards_dir(data_root)) or {}
    settings = {k: v for k, v in dataclasses.asdict(cfg.pretrain).items() if k != "before_train"}
    doc = {"arch": pretrain_arch(cfg).to_dict(), "input_size": cfg.data.input_size,
           "pretrain": settings,
           "data": {k: manifest.get(k) for k in ("dataset", "generator", "counts", "shards")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_dir(cfg: Config, data_root: str | Path) -> Path:
    arch = pretrain_arch(cfg)
    name = f"{cfg.model.preset}-{arch.image_resolution}px-{cache_key(cfg, data_root)}"
    return Path(data_root) / "synthclip" / name


def ensure_synthclip(cfg: Config, data_root: str | Path, backend: Backend) -> Path:
    """The cached SynthCLIP weights for ``cfg``, pretraining them first if absent."""
    out = cache_dir(cfg, data_root)
    with folder_lock(out.parent):
        if not (out / WEIGHTS_NAME).is_file():
            phase(f"SynthCLIP weights for this setup are not cached: pretraining them once "
                  f"({cfg.pretrain.epochs} epochs) into {out}")
            run_pretrain(cfg, data_root, out, backend)
    return out / WEIGHTS_NAME


def with_synthclip(cfg: Config, data_root: str, backend: Backend) -> Config:
    """``cfg`` starting from SynthCLIP weights when ``pretrain.before_train`` is set and no
    ``model.clip_weights`` is given (pretrained once, then read from the cache)."""
    if not cfg.pretrain.before_train or cfg.model.clip_weights or cfg.model.init_checkpoint:
        return cfg
    if is_uri(data_root):
        raise PretrainError(f"pretrain.before_train caches weights beside the data, but "
                            f"data.root is {data_root}; run 'python run.py pretrain --out DIR' "
                            "and set model.clip_weights=DIR/clip.pt")
    weights = ensure_synthclip(cfg, data_root, backend)
    say(f"starting from SynthCLIP weights {weights}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                             clip_weights=str(weights)))


def run_pretrain(cfg: Config, data_root: str | Path, out_dir: str | Path,
                 backend: Backend) -> dict:
    """Pretrain, export ``clip.pt`` and write ``report.json``; returns the report."""
    started = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    arch = pretrain_arch(cfg)
    p = cfg.pretrain
    _say(f"building pairs from {data_root} ({cfg.data.train_split}; input "
         f"{cfg.data.input_size} px; object crops {'on' if p.crops else 'off'})")
    pairs = build_pairs(data_root, cfg.data.train_split, input_size=cfg.data.input_size,
                        word_len=cfg.data.word_len, crops=p.crops, scenes=p.scenes,
                        crop_size=p.crop_size, limit=p.limit_refs)
    probe = build_probe(data_root, cfg.data.val_split, input_size=cfg.data.input_size,
                        word_len=cfg.data.word_len, limit=cfg.data.limit_eval_refs)
    scenes, crops = len(pairs.scene_images), len(pairs.crop_images)
    _say(f"{scenes} scenes ({len(pairs.scene_tokens)} expressions), {crops} object crops; "
         f"{len(probe)} {cfg.data.val_split} refs to measure")
    before = probe_metrics(build_synthclip(arch, p.seed), probe)
    _say("before: " + format_metrics(before))
    pairs_path = out / "pairs.npz"
    save_pairs(pairs, pairs_path)
    loop_config = {"pairs_path": str(pairs_path), "arch": arch.to_dict(), "seed": p.seed,
                   "epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
                   "weight_decay": p.weight_decay}
    try:
        state, epochs = _run_workers(cfg, loop_config, out, backend)
    finally:
        pairs_path.unlink(missing_ok=True)
    model = build_synthclip(arch, p.seed)
    model.backbone.load_state_dict(state)
    after = probe_metrics(model, probe)
    _say("after:  " + format_metrics(after))
    save_clip_weights(out / WEIGHTS_NAME, state, arch)
    report = {"weights": str(out / WEIGHTS_NAME), "arch": arch.to_dict(),
              "pretrain": dataclasses.asdict(p), "input_size": cfg.data.input_size,
              "pairs": {"scenes": scenes, "expressions": len(pairs.scene_tokens),
                        "crops": crops},
              "probe_refs": len(probe),
              "epochs": epochs, "before": before, "after": after,
              "wall_s": round(time.time() - started, 1)}
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    _say(f"wrote {out / WEIGHTS_NAME} and {REPORT_NAME} in {report['wall_s']:.0f} s")
    return report


def format_metrics(m: dict) -> str:
    return (f"text->image R@1 {m['R@1']:.3f} R@5 {m['R@5']:.3f}; GradCAM pointing in box "
            f"{m['pointing_box']:.3f} (chance {m['pointing_box_chance']:.3f}), over the image "
            f"{m['pointing_image']:.3f} (chance {m['pointing_image_chance']:.3f}); A on mask - "
            f"off mask in box {m['a_contrast']:+.3f}")


def _run_workers(cfg: Config, loop_config: dict, out: Path,
                 backend: Backend) -> tuple[dict, list[dict]]:
    """The loop on ``backend``'s workers; returns what rank 0 reported at the end (the
    backbone's state dict, every epoch's metrics). The workers' run folder is removed after."""
    workers = out / "workers"
    shutil.rmtree(workers, ignore_errors=True)   # what an interrupted attempt left
    try:
        result = backend.run(pretrain_loop, loop_config, storage=str(out), name=workers.name,
                             ray=cfg.ray)
        return read_backbone_checkpoint(result.latest)
    finally:
        shutil.rmtree(workers, ignore_errors=True)


def _say(text: str) -> None:
    say(f"pretrain: {text}")
