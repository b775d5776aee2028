"""``run.py demo``: a browser page (Gradio) for one image + sentence at a time."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from gtms.commands.common import add_checkpoint_config_flags, positive_int
from gtms.commands.predict import add_model_source_flags, add_predictor_flags, predictor_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="a browser page: upload an image, type a sentence, see the mask (Gradio)",
        description="Serve a web page (Gradio, an optional extra: pip install -r "
                    "requirements-demo.txt) where you upload an image and type a sentence; it "
                    "shows the overlay and the mask that 'run.py predict' writes for the pair "
                    "(same preprocessing, pixel limit, EXIF orientation and sentence checks; "
                    "a refused pair is a message on the page) and, on request, the GTMS panels "
                    "of 'run.py visualize' (structural forest, GradCAM attention A, vertex "
                    "weights W, pseudo label P^), which need a box: a val example's "
                    "ground-truth box, or one typed as x,y,w,h. When the checkpoint's dataset "
                    "(data.root) is prepared, its first val refs are offered as examples. "
                    "Nothing leaves this machine (no share link, no analytics). Exit code 2 "
                    "when Gradio is missing, the checkpoint cannot be used or the port cannot "
                    "be served.",
        epilog="example: python run.py demo --checkpoint runs/<run>/checkpoint_epoch_0010, then "
               "open http://127.0.0.1:7860/")
    add_model_source_flags(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0: every network interface)")
    parser.add_argument("--port", type=port_number, default=7860,
                        help="port to listen on (default 7860)")
    parser.add_argument("--examples", type=int, default=4, metavar="N",
                        help="val refs of the checkpoint's dataset offered as examples, when "
                             "it is prepared (default 4; 0: none)")
    parser.add_argument("--panel-size", type=positive_int, default=256, metavar="PX",
                        help="width and height of each GTMS panel in pixels (default 256)")
    add_predictor_flags(parser)
    add_checkpoint_config_flags(parser, example="--set pseudo.sigma=0.05")
    parser.set_defaults(func=run)


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    from gtms.infer.demo import DemoModel, build_app, load_examples, require_gradio, serve

    with tempfile.TemporaryDirectory(prefix="gtms-demo-") as folder:
        # Gradio's copies of the uploads go here and leave with the server (default: kept in
        # /tmp/gradio for good); read when gradio is imported
        os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(folder) / "uploads"))
        require_gradio()  # before the model loads: a missing extra is the first thing to say
        predictor = predictor_from_args(args)
        print(f"model on {predictor.device}: input {predictor.input_size}, threshold "
              f"{predictor.threshold}", flush=True)
        if predictor.config is None:
            examples, note = [], "no val examples with an exported model (--model)"
        else:
            examples, note = load_examples(predictor.config, Path(folder), args.examples)
        print(note, flush=True)
        app = build_app(DemoModel(predictor, examples, panel_size=args.panel_size), examples,
                        note)
        serve(app, args.host, args.port, allowed_paths=[folder])
    return 0
