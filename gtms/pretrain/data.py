"""SynthCLIP pairs: (image, text) for contrastive pretraining, and the val set its metrics use.

Two kinds of pairs come from a split's shards (one row per ref):

- **scene pairs**: the letterboxed scene with each of the ref's expressions;
- **object pairs** (``crops=True``): a square crop centred on the referred object (its box side
  times ``CROP_CONTEXT``, so some background and neighbours stay in view) letterboxed to the
  same size, captioned ``"{colour} {noun}"`` from SynthRef's ``scenes.json`` (just the
  category name on other datasets).

Object pairs teach the attention pool's global embedding *what* an object looks like (colour and
shape), which scene pairs alone barely do on a small dataset; that is what makes GradCAM land on
the object (measured in the pretrain report). Images are kept as letterboxed uint8
``[N, S, S, 3]``; :func:`to_model_input` normalises a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from gtms.data.shards import read_shard_records, split_files
from gtms.data.tokenizer import ClipTokenizer
from gtms.data.transforms import CLIP_MEAN, CLIP_STD, Letterbox, decode_image

CROP_CONTEXT = 1.3   # crop side = this x the box's longer side
STRIDE = 4           # output stride of the rasters the pointing metrics use
_MEAN_U8 = tuple(round(255 * m) for m in CLIP_MEAN)


@dataclass(frozen=True)
class PairSet:
    """Contrastive pairs of one split.

    Scenes: each distinct image once, with every expression of every ref on it (an epoch pairs
    each scene with one of them). Crops: one per referred object, with its caption. ``*_text``
    numbers identical texts, so two pairs with the same text are positives of each other.
    """

    scene_images: np.ndarray    # [M, S, S, 3] uint8, letterboxed
    scene_tokens: np.ndarray    # [T, L] int64, every expression
    scene_text: np.ndarray      # [T] int64 text number
    scene_of_text: np.ndarray   # [T] which scene each expression belongs to
    crop_images: np.ndarray     # [K, C, C, 3] uint8
    crop_tokens: np.ndarray     # [K, L]
    crop_text: np.ndarray       # [K]

    def __len__(self) -> int:
        return len(self.scene_images) + len(self.crop_images)

    def epoch_expressions(self, seed: int, epoch: int) -> np.ndarray:
        """For each scene, the index (into ``scene_tokens``) of its expression this epoch."""
        if not len(self.scene_of_text):
            return np.zeros(0, np.int64)
        rng = np.random.default_rng([seed, epoch, 7])
        keys = rng.random(len(self.scene_of_text)) + self.scene_of_text  # random within scene
        order = np.argsort(keys, kind="stable")
        first = np.r_[0, np.flatnonzero(np.diff(self.scene_of_text[order])) + 1]
        return order[first]


@dataclass(frozen=True)
class ProbeSet:
    """Val refs for the metrics: one sentence each, the scene it refers to, box and mask."""

    images: np.ndarray          # [M, S, S, 3] uint8, the distinct scenes
    image_index: np.ndarray     # [N] which scene each ref's sentence belongs to
    tokens: np.ndarray          # [N, L]
    box_at_stride4: np.ndarray  # [N, S/4, S/4] float32 {0, 1}
    mask_at_stride4: np.ndarray  # [N, S/4, S/4] float32 {0, 1}

    def __len__(self) -> int:
        return len(self.tokens)


def object_captions(data_root: str | Path) -> dict[int, str]:
    """``ann_id -> "colour noun"`` from SynthRef's ``scenes.json``; empty when there is none."""
    path = Path(data_root) / "synthref" / "scenes.json"
    if not path.is_file():
        return {}
    scenes = json.loads(path.read_text())
    return {obj["ann_id"]: f"{obj['colour']} {obj['category']}"
            for image in scenes["images"] for obj in image["objects"]}


def crop_object(image: np.ndarray, box_xywh, size: int) -> np.ndarray:
    """Square crop around a box (side ``CROP_CONTEXT`` x its longer side), resized to
    ``[size, size, 3]`` uint8 with INTER_CUBIC; outside the image is CLIP's mean colour."""
    x, y, w, h = (float(v) for v in box_xywh)
    side = max(w, h, 1.0) * CROP_CONTEXT
    scale = size / side
    cx, cy = x + w / 2, y + h / 2
    matrix = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=_MEAN_U8)


def letterbox_u8(image: np.ndarray, size: int) -> np.ndarray:
    """The training letterbox of ``image``, as uint8 ``[size, size, 3]``."""
    letterbox = Letterbox(image.shape[0], image.shape[1], size)
    return np.clip(np.round(letterbox.apply_image(image) * 255), 0, 255).astype(np.uint8)


def build_pairs(data_root: str | Path, split: str, *, input_size: int, word_len: int,
                crops: bool = True, scenes: bool = True, crop_size: int = 0,
                limit: int = 0) -> PairSet:
    """Scenes with all their expressions and, with ``crops``, one crop per referred object
    (``crop_size`` px, default ``input_size``)."""
    tokenizer = ClipTokenizer()
    captions = object_captions(data_root)
    crop_size = crop_size or input_size
    use_scenes = scenes
    scenes, scene_of_image, expressions, owner = [], {}, [], []
    crop_images, crop_texts = [], []
    for k, (record, data) in enumerate(_records(data_root, split)):
        if limit and k >= limit:
            break
        image = decode_image(data)
        if use_scenes and record.image_id not in scene_of_image:
            scene_of_image[record.image_id] = len(scenes)
            scenes.append(letterbox_u8(image, input_size))
        for sentence in record.sentences if use_scenes else ():
            expressions.append(sentence)
            owner.append(scene_of_image[record.image_id])
        if crops:
            crop_images.append(crop_object(image, record.box_xywh, crop_size))
            crop_texts.append(captions.get(record.ann_id, record.category))
    if not expressions and not crop_texts:
        raise ValueError(f"no {split} pairs under {data_root}: nothing to pretrain on")
    number = {text: i for i, text in enumerate(dict.fromkeys(expressions + crop_texts))}
    empty = np.zeros((0, crop_size, crop_size, 3), np.uint8)
    return PairSet(
        scene_images=np.stack(scenes) if scenes else
        np.zeros((0, input_size, input_size, 3), np.uint8),
        scene_tokens=tokenizer(expressions, word_len) if expressions else
        np.zeros((0, word_len), np.int64),
        scene_text=np.array([number[t] for t in expressions], np.int64),
        scene_of_text=np.array(owner, np.int64),
        crop_images=np.stack(crop_images) if crop_images else empty,
        crop_tokens=tokenizer(crop_texts, word_len) if crop_texts else
        np.zeros((0, word_len), np.int64),
        crop_text=np.array([number[t] for t in crop_texts], np.int64))


def build_probe(data_root: str | Path, split: str, *, input_size: int, word_len: int,
                limit: int = 0) -> ProbeSet:
    """The first sentence of each ``split`` ref, with its scene, box and mask at stride 4."""
    tokenizer = ClipTokenizer()
    scenes, scene_of_image = [], {}
    index, texts, boxes, masks = [], [], [], []
    for k, (record, data) in enumerate(_records(data_root, split)):
        if limit and k >= limit:
            break
        letterbox = Letterbox(record.height, record.width, input_size)
        if record.image_id not in scene_of_image:
            scene_of_image[record.image_id] = len(scenes)
            scenes.append(letterbox_u8(decode_image(data), input_size))
        index.append(scene_of_image[record.image_id])
        texts.append(record.sentences[0])
        boxes.append(letterbox.box_at_stride(record.box_xywh, STRIDE))
        masks.append(letterbox.mask_at_stride(record.decode_mask(), STRIDE))
    if not texts:
        raise ValueError(f"no {split} refs under {data_root}: nothing to measure")
    return ProbeSet(images=np.stack(scenes), image_index=np.array(index, np.int64),
                    tokens=tokenizer(texts, word_len), box_at_stride4=np.stack(boxes),
                    mask_at_stride4=np.stack(masks))


def to_model_input(images_u8) -> torch.Tensor:  # noqa: F821 (torch imported lazily)
    """uint8 ``[B, S, S, 3]`` (numpy or tensor) -> normalised float32 ``[B, 3, S, S]``."""
    import torch

    x = torch.as_tensor(np.asarray(images_u8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _records(data_root: str | Path, split: str):
    files = split_files(Path(data_root) / "shards", split)
    if not files:
        raise ValueError(f"no shards of split {split!r} under {data_root}/shards")
    for file in files:
        yield from read_shard_records(file)
