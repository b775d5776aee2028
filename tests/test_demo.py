"""``run.py demo``: the Gradio page shows ``run.py predict``'s overlay and refuses what it refuses.

The browser test starts ``python run.py demo`` on a free port, drives it in headless Chromium
(Selenium with the system chromedriver, nothing downloaded), and compares the overlay and the
mask the page serves with ``predict``'s PNGs pixel for pixel; its screenshot is kept in
``test-output/demo_screenshot.png``. The other tests call the page's handler in this process.
One tiny GTMS checkpoint (input 64, one epoch on 8 refs) is trained per module.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_images import png_header_only
from test_predict import train_tiny_checkpoint

import run
from gtms.infer.predict import Predictor, read_image

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "test-output" / "demo_screenshot.png"
PANEL = 96
PANELS = 7
INSTALL = "pip install -r requirements-demo.txt"


@pytest.fixture(scope="module")
def checkpoint(synthref_small, tmp_path_factory) -> Path:
    return train_tiny_checkpoint(synthref_small, tmp_path_factory.mktemp("demo_runs"))


@pytest.fixture(scope="module")
def images(synthref_small) -> list[Path]:
    return sorted((synthref_small / "images").glob("*.jpg"))[:2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exif_photo(image: Path, path: Path) -> Path:
    """A JPEG of part of ``image`` stored sideways, with EXIF orientation 6 to show it upright."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(read_image(image)[:40, :60]).save(path, exif=exif)
    return path


def visible_threshold(checkpoint: Path, image: Path, text: str) -> str:
    """A threshold that keeps ~30 % of the image, whatever the briefly trained model outputs
    (so that the screenshot shows a mask)."""
    predictor = Predictor.from_checkpoint(checkpoint)
    (probs,) = predictor.probabilities([predictor.prepare(read_image(image), text)])
    return f"{np.clip(np.quantile(probs, 0.7), 0.01, 0.99):.6f}"


def predicted(checkpoint: Path, image: Path, text: str, out: Path,
              threshold: str) -> tuple[np.ndarray, ...]:
    """``run.py predict``'s overlay (BGR) and mask PNGs for one pair."""
    assert run.main(["predict", "--checkpoint", str(checkpoint), "--image", str(image),
                     "--text", text, "--out", str(out), "--threshold", threshold]) == 0
    record = json.loads((out / "predictions.jsonl").read_text())
    return cv2.imread(record["overlay"]), cv2.imread(record["mask"], cv2.IMREAD_UNCHANGED)


# --------------------------------------------------------------------------- without a browser


def test_without_gradio_exits_2_naming_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails as if absent
    assert run.main(["demo", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "needs Gradio" in err and INSTALL in err
    assert "missing" not in err.split("needs Gradio")[0]  # said before loading the checkpoint


def test_unusable_checkpoint_or_port_exits_2_before_serving(checkpoint, tmp_path, capsys):
    pytest.importorskip("gradio")
    assert run.main(["demo", "--checkpoint", str(tmp_path / "missing"),
                     "--port", str(free_port())]) == 2
    captured = capsys.readouterr()
    assert str(tmp_path / "missing") in captured.err and "demo running" not in captured.out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run.main(["demo", "--checkpoint", str(checkpoint), "--port", str(port),
                         "--examples", "0"]) == 2
    captured = capsys.readouterr()
    assert f"cannot serve the demo on 127.0.0.1:{port}" in captured.err
    assert "demo running" not in captured.out


def test_page_refuses_what_predict_refuses(checkpoint, images, tmp_path):
    from gtms.infer.demo import EXPORTED, NO_BOX, DemoModel, respond

    demo = DemoModel(Predictor.from_checkpoint(checkpoint), panel_size=PANEL)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(20000, 20000))
    for path, text, needle in ((huge, "a star", "20000 x 20000 = 400,000,000 pixels"),
                               (tmp_path / "gone.jpg", "a star", "image not found"),
                               (images[0], " &nbsp; ", "empty referring expression"),
                               (None, "a star", "no image")):
        overlay, mask, panels, message = respond(demo, path and str(path), text, "", True)
        assert overlay is None and mask is None and panels is None
        assert "error:" in message and needle in message
    answer = demo.answer(str(images[0]), "the big red star " * 20)
    assert answer.error is None and "warning: the sentence has 82 tokens" in answer.html()
    height, width = read_image(images[0]).shape[:2]
    for box, note in (("", NO_BOX), ("1,2,3", "is not four numbers"),
                      (f"0,0,{width + 50},10", "does not fit")):
        answer = demo.answer(str(images[0]), "the star", box, panels=True)
        assert answer.panels is None and note in answer.notes[-1]
    answer = demo.answer(str(images[0]), "the star", "5,5,40,30", panels=True)
    assert answer.panels.shape[1] == PANELS * PANEL and "no ground truth" in answer.notes[-1]
    predictor = demo.predictor
    exported = Predictor(predictor.model, input_size=64, word_len=17, threshold=0.35,
                         device=predictor.device)  # an exported model carries no config
    answer = DemoModel(exported).answer(str(images[0]), "the star", "5,5,40,30", panels=True)
    assert answer.overlay is not None and answer.notes[-1] == EXPORTED


def test_val_example_panels_use_its_ground_truth(checkpoint, tmp_path):
    from gtms.infer.demo import DemoModel, load_examples

    predictor = Predictor.from_checkpoint(checkpoint)
    examples, note = load_examples(predictor.config, tmp_path / "examples", 2)
    assert len(examples) == 2 and "2 val example(s) of synthref" in note
    demo = DemoModel(predictor, examples, panel_size=PANEL)
    example = examples[1]
    answer = demo.answer(example.path, example.sentence, example.box, panels=True)
    assert answer.panels.shape[1] == PANELS * PANEL
    assert f"ground-truth box and mask of val ref {int(example.row['ref_id'])}" in \
        answer.notes[-1]
    cfg = predictor.config
    elsewhere = replace(cfg, data=replace(cfg.data, root=str(tmp_path / "nowhere")))
    examples, note = load_examples(elsewhere, tmp_path / "none")
    assert examples == [] and note.startswith("no val examples") and "nowhere" in note


# --------------------------------------------------------------------------- in a browser


def browser_tools_or_skip() -> tuple[str, str]:
    """Chromium's and chromedriver's paths; skip, naming what is missing, without them."""
    missing = [f"the Python package {name} ({INSTALL})" for name in ("gradio", "selenium")
               if importlib.util.find_spec(name) is None]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        missing.append("Chromium and chromedriver (apt-get install -y chromium "
                       "chromium-driver)")
    if missing:
        pytest.skip(f"the browser test needs {' and '.join(missing)}")
    return chromium, driver


@contextmanager
def demo_server(checkpoint: Path, log: Path, *flags: str):
    """``python run.py demo`` on a free port, as a user starts it; yields (URL, process)."""
    port = free_port()
    command = [sys.executable, "run.py", "demo", "--checkpoint", str(checkpoint),
               "--port", str(port), "--panel-size", str(PANEL), "--examples", "2", *flags]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, f"run.py demo exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer at {url}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def chromium(binary: str, driver_path: str):
    """Headless Chromium through the system chromedriver; Selenium Manager is never asked."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1280,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The demo page in the browser: upload, type, submit, read the answer."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        driver.get(url)
        self.wait = WebDriverWait(driver, 30)
        self.wait.until(lambda d: self.find("#gtms-image input[type=file]"))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def ask(self, image: Path, text: str, box: str = "", *, expect: str) -> str:
        """Upload ``image``, type ``text`` and ``box``, press Segment; wait for the message
        that holds ``expect`` and return it."""
        from selenium.webdriver.common.keys import Keys

        for button in self.find("#gtms-image button[aria-label='Clear']"):
            button.click()
        self.wait.until(lambda d: self.find("#gtms-image input[type=file]"))
        self.find("#gtms-image input[type=file]")[0].send_keys(str(image))
        # uploaded: the file's link points at the server's copy
        self.wait.until(lambda d: self.find("#gtms-image a[href*='file=']"))
        for css, value in (("#gtms-text textarea", text), ("#gtms-box textarea", box)):
            field = self.find(css)[0]
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(Keys.BACKSPACE)
            field.send_keys(value)
        self.find("#gtms-submit")[0].click()
        self.wait.until(lambda d: expect in self.message())
        return self.message()

    def pick_example(self, name: str, *, expect: str) -> str:
        """Click the val example whose image file is ``name``, press Segment, wait for
        ``expect``."""
        from selenium.webdriver.common.by import By

        cell = self.driver.find_element(By.XPATH, f"//td[contains(., '{name}')]")
        cell.click()
        self.wait.until(lambda d: name in self.find("#gtms-image")[0].text)
        self.find("#gtms-submit")[0].click()
        self.wait.until(lambda d: expect in self.message())
        return self.message()

    def message(self) -> str:
        found = self.find("#gtms-message")
        return found[0].text if found else ""

    def image(self, elem_id: str) -> np.ndarray | None:
        """The PNG an output shows, fetched from the server as the browser does (BGR / grey)."""
        found = self.find(f"#{elem_id} img")
        if not found:
            return None
        with urllib.request.urlopen(found[0].get_attribute("src"), timeout=10) as response:
            data = response.read()
        assert data.startswith(b"\x89PNG"), f"{elem_id} is not served as PNG"
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.integration
def test_browser_page_shows_predicts_overlay_and_survives_a_broken_image(
        checkpoint, images, tmp_path, artifact):
    binary, driver_path = browser_tools_or_skip()
    photo = exif_photo(images[1], tmp_path / "photo.jpg")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x00garbage, not a PNG at all" * 10)
    text = "the green crescent on the right"
    log = tmp_path / "demo.log"
    threshold = visible_threshold(checkpoint, images[0], text)
    with demo_server(checkpoint, log, "--threshold", threshold) as (url, process), \
            chromium(binary, driver_path) as driver:
        page = Page(driver, url)
        page.find("#gtms-want-panels input")[0].click()
        message = page.ask(images[0], text, "100,40,106,150", expect="GTMS panels with the box")
        overlay, mask = page.image("gtms-overlay"), page.image("gtms-mask")
        panels = page.image("gtms-panels")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        artifact(SCREENSHOT, "run.py demo in Chromium (tests/test_demo.py)")
        assert "error" not in message and panels.shape[1] == PANELS * PANEL
        message = page.ask(broken, text, expect="error:")
        assert "broken.png is not an image whose size Pillow can read" in message
        assert page.image("gtms-overlay") is None
        height, width = read_image(photo).shape[:2]
        page.ask(photo, "the star", expect=f"of the {width} x {height} image")
        photo_overlay, photo_mask = page.image("gtms-overlay"), page.image("gtms-mask")
        page.pick_example("val_ref2", expect="ground-truth box and mask of val ref 2")
        assert process.poll() is None
    served = log.read_text()
    assert f"demo running at {url}" in served and "Traceback" not in served
    for (got_overlay, got_mask), (image, sentence) in (((overlay, mask), (images[0], text)),
                                                       ((photo_overlay, photo_mask),
                                                        (photo, "the star"))):
        want_overlay, want_mask = predicted(checkpoint, image, sentence,
                                            tmp_path / f"predict_{image.stem}", threshold)
        assert np.array_equal(got_overlay, want_overlay)
        assert np.array_equal(got_mask, want_mask)
