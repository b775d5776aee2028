"""``run.py predict``: masks for your own image + sentence pairs, at the original resolution."""

from __future__ import annotations

import argparse
import sys

from gtms.commands.common import add_checkpoint_config_flags, add_checkpoint_flag, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment the object a sentence refers to in your own images",
        description="For each image + sentence pair: letterbox, CRIS, sigmoid, inverse letterbox "
                    "to the original image, threshold. Writes <out>/NNNN_<image>_mask.png (0/255, "
                    "the image's original size), <out>/NNNN_<image>_overlay.png (mask tinted "
                    "on the image, the sentence above) and <out>/predictions.jsonl (one record "
                    "per pair: image, text, mask, overlay, mask_area_fraction, error, warning). "
                    "A sentence longer than data.word_len is cut, with a warning giving its "
                    "token count. A pair "
                    "that fails (missing or undecodable image, image over the pixel limit, "
                    "empty text) is reported and the others go on. Images are read as "
                    "viewers show them (EXIF orientation applied). Exit code: 0 all pairs "
                    "ok, 1 some failed, 2 the checkpoint or config cannot be used.",
        epilog='example: python run.py predict --checkpoint runs/<run>/checkpoint_epoch_0010 '
               '--image cat.jpg --text "the cat on the left" --image dogs.png --text '
               '"the smaller dog"')
    add_model_source_flags(parser)
    parser.add_argument("--image", dest="images", action="append", default=[], metavar="IMG",
                        help="an image file; repeat --image/--text in pairs (the k-th image "
                             "goes with the k-th text)")
    parser.add_argument("--text", dest="texts", action="append", default=[], metavar="TEXT",
                        help="the referring expression of the matching --image")
    parser.add_argument("--jsonl", default=None, metavar="FILE",
                        help='more pairs, one JSON object a line: {"image": path, "text": '
                             '"..."}; relative paths are resolved against the file\'s folder')
    parser.add_argument("--out", default="predictions", metavar="DIR",
                        help="output folder (default: ./predictions)")
    add_predictor_flags(parser)
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="pairs per forward pass (default 8)")
    parser.add_argument("--ignore-orientation", action="store_true",
                        help="use the stored pixels of JPEGs with an EXIF orientation (as COCO "
                             "annotations do); default: the image as viewers show it")
    add_checkpoint_config_flags(parser, example="--set model.preset=rn50")
    parser.set_defaults(func=run)


def add_model_source_flags(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` or ``--model`` (an exported file), one of them."""
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_flag(source, required=False)
    source.add_argument("--model", metavar="FILE",
                        help="a model written by 'run.py export' (.onnx through ONNX Runtime, "
                             "or TorchScript), run on the CPU with the same pre- and "
                             "post-processing")


def add_predictor_flags(parser: argparse.ArgumentParser) -> None:
    """``--threshold``, ``--input-size``, ``--max-image-pixels`` and ``--device``: how the model
    of ``--checkpoint`` / ``--model`` runs (:func:`predictor_from_args`)."""
    parser.add_argument("--threshold", type=float, default=None, metavar="T",
                        help="probability threshold, i.e. --set train.threshold=T (default: "
                             "the checkpoint's config, 0.35 as CRIS)")
    parser.add_argument("--input-size", type=int, default=None, metavar="S",
                        help="letterbox size, a multiple of 32, i.e. --set data.input_size=S "
                             "(default: the checkpoint's config)")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="refuse images with more pixels than N, read from the file header "
                             "before decoding, i.e. --set data.max_image_pixels=N (default: "
                             "the checkpoint's config, 89478485 as Pillow's limit; 0 = no "
                             "limit)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")


def predictor_from_args(args: argparse.Namespace):
    """The :class:`~gtms.infer.predict.Predictor` of ``--checkpoint`` (with ``--config``,
    ``--set`` and the flags of :func:`add_predictor_flags` as overrides) or ``--model``."""
    from gtms.infer.predict import Predictor, pick_device

    overrides = list(args.overrides)
    if args.threshold is not None:
        overrides.append(f"train.threshold={args.threshold}")
    if args.input_size is not None:
        overrides.append(f"data.input_size={args.input_size}")
    if args.max_image_pixels is not None:
        overrides.append(f"data.max_image_pixels={args.max_image_pixels}")
    if args.model:
        return Predictor.from_exported(args.model, threshold=args.threshold,
                                       max_image_pixels=args.max_image_pixels)
    return Predictor.from_checkpoint(args.checkpoint, args.config, overrides,
                                     device=pick_device(args.device))


def run(args: argparse.Namespace) -> int:
    from gtms.data.tokenizer import shortened
    from gtms.infer.predict import (
        InferenceError,
        pair_requests,
        predict_pairs,
        read_jsonl_requests,
    )

    requests = pair_requests(args.images, args.texts)
    if args.jsonl:
        requests += read_jsonl_requests(args.jsonl)
    if not requests:
        raise InferenceError("nothing to predict: give --image IMG --text TEXT pairs and/or "
                             "--jsonl FILE")
    predictor = predictor_from_args(args)
    print(f"predicting {len(requests)} pair(s) on {predictor.device}: input {predictor.input_size}"
          f", threshold {predictor.threshold}, batch {args.batch_size}", flush=True)

    def echo(record, number: int, total: int) -> None:
        head = f"[{number}/{total}] {record.image} {shortened(record.text)!r}"
        if record.warning:
            print(f"{head}: warning: {record.warning}", file=sys.stderr, flush=True)
        if record.ok:
            print(f"{head}: mask {record.mask}, overlay {record.overlay} "
                  f"(area {100 * record.mask_area_fraction:.1f}%)", flush=True)
        else:
            print(f"{head}: FAILED: {record.error}", flush=True)

    records = predict_pairs(predictor, requests, args.out, batch_size=args.batch_size,
                            apply_orientation=not args.ignore_orientation, echo=echo)
    failed = sum(not r.ok for r in records)
    print(f"{len(records) - failed} ok, {failed} failed; records in "
          f"{args.out}/predictions.jsonl")
    return 1 if failed else 0
