"""gtms.storage: the cache lock that SynthRef generation and SynthCLIP pretraining share."""

from __future__ import annotations

import threading
import time

from gtms.storage import folder_lock, join


def test_folder_lock_makes_a_second_holder_wait(tmp_path):
    folder = tmp_path / "cache" / "nested"          # created by the lock
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.set()
        with folder_lock(folder):
            order.append("second")

    with folder_lock(folder):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(5)
        time.sleep(0.2)                              # the second holder is blocked meanwhile
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
    assert (folder / ".lock").exists()


def test_folder_lock_names_are_independent(tmp_path):
    with folder_lock(tmp_path, ".prepare.lock"):
        with folder_lock(tmp_path, ".lock"):         # another name: no wait, no deadlock
            pass
    assert {p.name for p in tmp_path.iterdir()} == {".prepare.lock", ".lock"}


def test_join_local_and_uri():
    assert join("s3://bucket/runs/", "a", "b") == "s3://bucket/runs/a/b"
    assert join("/tmp/runs", "a") == "/tmp/runs/a"
