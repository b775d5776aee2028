"""``run.py export``: a trained model as an ONNX or TorchScript file."""

from __future__ import annotations

import argparse
import shlex

from gtms.commands.common import add_checkpoint_config_flags, add_checkpoint_flag


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a trained model as ONNX or TorchScript (image + tokens -> logits)",
        description="Export the model of a checkpoint from image and tokens to the mask logits "
                    "at stride 4: input size and word length fixed by the checkpoint's config, "
                    "batch dynamic. Writes FILE and FILE.json (what predict needs); run it with "
                    "'run.py predict --model FILE'. ONNX needs onnx, onnxscript and "
                    "onnxruntime (requirements-dev.txt).",
        epilog="example: python run.py export --checkpoint runs/demo/checkpoint_epoch_0010 "
               "--format onnx --out demo.onnx")
    add_checkpoint_flag(parser)
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    add_checkpoint_config_flags(parser, example="--set data.input_size=320")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gtms.infer.export import export_model

    meta = export_model(args.checkpoint, args.format, args.out, args.config, args.overrides)
    command = shlex.join(["python", "run.py", "predict", "--model", str(args.out), "--image",
                          "IMG", "--text", "TEXT"])
    print(f"wrote {args.out} ({meta['format']}: image [B, 3, {meta['input_size']}, "
          f"{meta['input_size']}] + tokens [B, {meta['word_len']}] -> logits) and "
          f"{args.out}.json; run it with: {command}")
    return 0
