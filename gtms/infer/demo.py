"""``run.py demo``: a browser page (Gradio) that segments what a sentence refers to in an image.

One request is one image + one sentence, run as ``run.py predict`` runs a pair: the image read by
:func:`gtms.infer.predict.read_image` (pixel limit read from the header before decoding, EXIF
orientation applied), the sentence checked by :meth:`Predictor.prepare` (an empty one refused,
an over-long one cut with :meth:`Predictor.truncation_warning`), the mask of
:meth:`Predictor.masks` and the overlay of :func:`gtms.viz.overlay_mask`, so the page's overlay is
``predict``'s overlay PNG pixel for pixel. A pair ``predict`` would refuse becomes a message on
the page; the server goes on.

The image comes through a ``gr.File`` upload: Gradio stores the bytes as the browser sent them
and passes their path, which goes to ``read_image`` untouched. (A ``gr.Image`` input opens the
file with Pillow first, which refuses undecodable files and large images before our checks,
transposes it by its EXIF orientation and may save a re-encoded copy.) The outputs are served as
PNG (``gr.Image``'s default is lossy WebP).

On request the page also draws the GTMS panels of ``run.py visualize`` for the pair
(:mod:`gtms.infer.visualize`: forest, GradCAM attention A, vertex weights W, P-hat, prediction,
ground truth). They need a box: a val example's ground-truth box (its mask too, so the IoU is
shown), or one typed as ``x,y,w,h`` for any image; and the checkpoint's PyTorch model.

Gradio is an optional extra (``requirements-demo.txt``), imported inside functions only.
"""

from __future__ import annotations

import hashlib
import html
import itertools
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gtms.config import Config
from gtms.data.pipeline import SampleSpec, preprocess_ref, spec_for
from gtms.data.reading import iter_shard_rows
from gtms.data.shards import verify_shards
from gtms.data.transforms import BoxOutsideImageError, decode_image, validate_box
from gtms.errors import UserError
from gtms.infer.predict import PairError, Predictor, read_image
from gtms.infer.visualize import (
    PSEUDO_MODE,
    draw_samples,
    draw_without_truth,
    panel_attention,
)
from gtms.viz import overlay_mask

INSTALL_COMMAND = "pip install -r requirements-demo.txt"
DEFAULT_EXAMPLES = 4
IMAGE_MAGIC = {".jpg": b"\xff\xd8\xff", ".png": b"\x89PNG\r\n\x1a\n"}  # example file names
NO_BOX = ("no GTMS panels: they need a box around the object; type it as x,y,w,h (pixels of "
          "the image as shown: left, top, width, height) or pick a val example (its "
          "ground-truth box)")
EXPORTED = ("no GTMS panels with an exported model (--model): GradCAM and the pseudo labels "
            "need the checkpoint's PyTorch model (--checkpoint)")


class DemoError(UserError):
    """The demo cannot start: Gradio is not installed, or the port cannot be served."""


def require_gradio():
    """The ``gradio`` module, its analytics off (nothing is sent anywhere); a
    :class:`DemoError` naming the install command when it is not installed."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as err:
        raise DemoError(f"run.py demo needs Gradio, an optional extra that is not installed "
                        f"({err}); install it with: {INSTALL_COMMAND}") from None
    return gradio


# --------------------------------------------------------------------------- val examples


@dataclass(frozen=True)
class Example:
    """A val ref offered on the page: its image as a file, its first sentence, its box."""

    path: str
    sentence: str
    box: str                 # its ground-truth box as the box field shows it, "x,y,w,h"
    row: dict[str, Any]      # the shard row: image bytes, box, mask


def format_box(box_xywh) -> str:
    return ",".join(f"{float(v):g}" for v in box_xywh)


def load_examples(cfg: Config, folder: Path, n: int = DEFAULT_EXAMPLES,
                  ) -> tuple[list[Example], str]:
    """The first ``n`` refs of the config's val split (``data.root`` as prepared: nothing is
    generated here), their images written into ``folder`` as stored; and a line saying what
    was found, or why there are none."""
    root, split = cfg.data.root, cfg.data.val_split
    if n <= 0:
        return [], "no val examples (--examples 0)"
    try:
        verify_shards(root, [split], checksums=False)
        rows = list(itertools.islice(iter_shard_rows(root, split), n))
    except (UserError, OSError) as err:
        return [], (f"no val examples: the checkpoint's data ({cfg.data.dataset} {split} at "
                    f"{root}) is not available ({err})")
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for row in rows:
        data = row["image"]
        suffix = next((s for s, magic in IMAGE_MAGIC.items() if data.startswith(magic)), "")
        path = folder / f"{split}_ref{int(row['ref_id'])}{suffix}"
        path.write_bytes(data)
        sentence = str(row["sentences"][0]) if len(row["sentences"]) else ""
        examples.append(Example(str(path), sentence, format_box(row["box_xywh"]), row))
    return examples, f"{len(examples)} val example(s) of {cfg.data.dataset} from {root}"


def parse_box(text: str, height: int, width: int) -> tuple[float, float, float, float]:
    """``"x,y,w,h"`` (pixels; commas or spaces) -> a box inside the ``height x width`` image;
    ``PairError`` saying what is wrong."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        box = [float(p) for p in parts]
    except ValueError:
        box = []
    if len(box) != 4:
        raise PairError(f"the box {text.strip()!r} is not four numbers x,y,w,h")
    try:
        return validate_box(box, height, width)
    except BoxOutsideImageError as err:
        raise PairError(f"the box {text.strip()!r} does not fit the {width} x {height} image: "
                        f"{err}") from None


# --------------------------------------------------------------------------- one request


@dataclass
class DemoAnswer:
    """What the page shows for one request."""

    overlay: np.ndarray | None = None     # RGB uint8, predict's overlay
    mask: np.ndarray | None = None        # uint8 0/255 at the image's size
    panels: np.ndarray | None = None      # RGB uint8, the GTMS panels in one row
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def html(self) -> str:
        """The message block of the page (escaped text, one paragraph per line)."""
        lines = [f"<p class='gtms-error'><b>error:</b> {html.escape(self.error)}</p>"] \
            if self.error else []
        lines += [f"<p>{html.escape(note)}</p>" for note in self.notes]
        return f"<div id='gtms-message-text'>{''.join(lines)}</div>"


class DemoModel:
    """A :class:`Predictor` and the val examples, answering the page's requests one at a time."""

    def __init__(self, predictor: Predictor, examples: list[Example] = (), *,
                 panel_size: int = 256):
        self.predictor = predictor
        self.examples: dict[str, list[Example]] = {}   # by the SHA-256 of their image file
        for example in examples:
            digest = hashlib.sha256(example.row["image"]).hexdigest()
            self.examples.setdefault(digest, []).append(example)
        self.panel_size = panel_size
        self._attention = None

    def answer(self, image_path: str | None, text: str | None, box_text: str | None = "",
               panels: bool = False) -> DemoAnswer:
        """One request, run as ``predict`` runs a pair; a pair it refuses becomes the error."""
        if not image_path:
            return DemoAnswer(error="no image: upload one (or pick an example) first")
        text, box_text = text or "", box_text or ""
        predictor = self.predictor
        try:
            image = read_image(image_path, max_pixels=predictor.max_image_pixels)
            pair = predictor.prepare(image, text)
        except PairError as err:
            return DemoAnswer(error=str(err))
        (mask,) = predictor.masks([pair])
        height, width = mask.shape
        answer = DemoAnswer(overlay_mask(image, mask, text), mask.astype(np.uint8) * 255)
        answer.notes.append(f"mask: {100 * mask.mean():.1f} % of the {width} x {height} image "
                            f"(input {predictor.input_size}, threshold {predictor.threshold})")
        warning = predictor.truncation_warning(pair)
        if warning:
            answer.notes.append(f"warning: {warning}")
        if panels:
            answer.panels, note = self.draw_panels(image_path, image, text, box_text)
            answer.notes.append(note)
        return answer

    def draw_panels(self, image_path: str, image: np.ndarray, text: str,
                    box_text: str) -> tuple[np.ndarray | None, str]:
        """The GTMS panels of the pair, and a line about them (why not, when they are not)."""
        cfg = self.predictor.config
        if cfg is None:
            return None, EXPORTED
        example = self.example_for(image_path, image, box_text)
        if example is not None:
            return self._example_panels(cfg, example, text)
        if not box_text.strip():
            return None, NO_BOX
        try:
            box = parse_box(box_text, *image.shape[:2])
        except PairError as err:
            return None, f"no GTMS panels: {err}"
        return self._box_panels(cfg, image, text, box), (
            f"GTMS panels with the box {format_box(box)} (no ground truth for this image)")

    def example_for(self, image_path: str, image: np.ndarray, box_text: str) -> Example | None:
        """The val example whose image file this is and whose box is typed (or the only one of
        that image, when none is), if the pixels as read are its stored pixels (an EXIF
        orientation would turn them): its mask is then the truth."""
        digest = hashlib.sha256(Path(image_path).read_bytes()).hexdigest()
        found = [e for e in self.examples.get(digest, ()) if box_text.strip() in ("", e.box)]
        if len(found) != 1 or not np.array_equal(image, decode_image(found[0].row["image"])):
            return None
        return found[0]

    def attention(self):
        """GradCAM's source for the panels, built on first use."""
        if self._attention is None:
            model = self.predictor.model
            self._attention = panel_attention(self.predictor.config,
                                              next(model.parameters()).device)
        return self._attention

    def _example_panels(self, cfg: Config, example: Example,
                        text: str) -> tuple[np.ndarray, str]:
        spec = spec_for("val", input_size=cfg.data.input_size, word_len=cfg.data.word_len,
                        mode=PSEUDO_MODE, seed=cfg.train.seed)
        samples = preprocess_ref(dict(example.row, sentences=[text]), spec,
                                 self.predictor.tokenizer)
        ((figure, panels),) = draw_samples(self.predictor.model, cfg, samples, spec,
                                           panel_size=self.panel_size,
                                           attention=self.attention())
        return panels, (f"GTMS panels with the ground-truth box and mask of val ref "
                        f"{figure.ref_id}: prediction IoU {100 * figure.iou:.1f} %, P^ IoU "
                        f"{100 * figure.pseudo_label_iou:.1f} %")

    def _box_panels(self, cfg: Config, image: np.ndarray, text: str, box) -> np.ndarray:
        spec = SampleSpec(cfg.data.input_size, cfg.data.word_len, training=False,
                          with_tree=True, with_forest=True, seed=cfg.train.seed)
        # A shard-like row, so the pipeline's own preprocessing runs; PNG keeps the pixels.
        png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
        row = {"ref_id": 0, "image": png, "height": image.shape[0], "width": image.shape[1],
               "box_xywh": box, "sentences": [text], "mask_rle_counts": ""}
        samples = [dict(s, sentence=text)
                   for s in preprocess_ref(row, spec, self.predictor.tokenizer)]
        (panels,) = draw_without_truth(self.predictor.model, cfg, samples, spec,
                                       panel_size=self.panel_size, attention=self.attention())
        return panels


def respond(demo: DemoModel, image_path, text, box_text, panels):
    """The page's handler: (overlay, mask, panels, message). An unexpected failure is logged
    with its traceback on the server's console and reported on the page in one line."""
    try:
        answer = demo.answer(image_path, text, box_text, bool(panels))
    except Exception as err:  # the page shows a message, never a traceback; the server goes on
        traceback.print_exc(file=sys.stderr)
        answer = DemoAnswer(error=f"unexpected {type(err).__name__}: {err} (details in the "
                                  "server's console)")
    return answer.overlay, answer.mask, answer.panels, answer.html()


# --------------------------------------------------------------------------- the page


INTRO = ("### GTMS: segment what a sentence refers to\n"
         "Upload an image, type a sentence, press **Segment**. The overlay and the mask are "
         "what `run.py predict` writes. *GTMS panels* adds the structural forest, GradCAM "
         "attention A, vertex weights W and the pseudo label P^ that training would use; they "
         "need a box (`x,y,w,h`), which the val examples carry.")


def build_app(demo: DemoModel, examples: list[Example] = (), examples_note: str = ""):
    """The Gradio page (a ``gr.Blocks``, not started) answering through :func:`respond`."""
    gr = require_gradio()
    with gr.Blocks(title="GTMS demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                inputs = _input_components(gr)
                if examples:
                    gr.Examples([[e.path, e.sentence, e.box] for e in examples], inputs[:3],
                                label=f"Examples: {examples_note}")
                elif examples_note:
                    gr.Markdown(examples_note)
                button = gr.Button("Segment", variant="primary", elem_id="gtms-submit")
            with gr.Column():
                message = gr.HTML(elem_id="gtms-message")
                overlay = gr.Image(label="overlay", format="png", interactive=False,
                                   elem_id="gtms-overlay")
                mask = gr.Image(label="mask", format="png", interactive=False,
                                elem_id="gtms-mask")
        panels = gr.Image(label="GTMS panels", format="png", interactive=False,
                          elem_id="gtms-panels")
        outputs = [overlay, mask, panels, message]
        # "private": only the page calls it; an API client cannot (it could pass a URL for
        # the server to download)
        gr.on([button.click, inputs[1].submit], lambda *values: respond(demo, *values),
              inputs=inputs, outputs=outputs, api_visibility="private")
    return app


def _input_components(gr) -> list:
    """Image upload (the file's bytes, untouched), sentence, optional box, panels checkbox."""
    image = gr.File(label="image", file_count="single", type="filepath",
                    elem_id="gtms-image")
    text = gr.Textbox(label="sentence", placeholder="the red star on the left",
                      elem_id="gtms-text")
    box = gr.Textbox(label="box x,y,w,h in pixels (optional: for the GTMS panels)",
                     placeholder="e.g. 40,25,120,90", elem_id="gtms-box")
    panels = gr.Checkbox(label="GTMS panels (forest, GradCAM A, W, P^; slower)",
                         elem_id="gtms-want-panels")
    return [image, text, box, panels]


MAX_UPLOAD = "100mb"   # a 100-megapixel JPEG is ~30 MB; the pixel limit guards decoding


def serve(app, host: str, port: int, *, allowed_paths: list[str] = ()) -> None:
    """Serve the page on ``host:port`` (no share link, no analytics), print its URL and block
    until Ctrl-C. ``DemoError`` when the address cannot be served."""
    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=False, prevent_thread_lock=True,
            quiet=True, show_error=False, allowed_paths=list(allowed_paths),
            max_file_size=MAX_UPLOAD)
    except OSError as err:
        raise DemoError(f"cannot serve the demo on {host}:{port} ({err}); pick another "
                        "--port or --host") from None
    print(f"demo running at http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    app.block_thread()
