"""Console output: colour only on a terminal, progress lines, --verbose, filters of Ray lines."""

from __future__ import annotations

import io
import os

import pytest

from gtms import console
from gtms.runtime import forwarded_lines


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# Lines of `python run.py train` as Ray 2.60 printed them before this change (ANSI codes kept).
RAY_LINES = [
    "\x1b[36m(TrainController pid=7180)\x1b[0m [2026-12-02 11:21:17,139 E 7180 7209] "
    "core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'db0b' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope",
    "[2026-12-02 11:21:44,244 E 6178 6178] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(Preprocessor))' and ID: 'b440' has constructor arguments in the "
    "object store and max_restarts > 0.",
    "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated and will be removed",
    "(raylet) WARNING: 16 PYTHON worker processes have been started on node: abc with address: "
    "1.2.3.4, which is 8x the maximum expected startup concurrency (2).",
    "2026-12-02 11:21:54,043\tINFO streaming_executor.py:371 -- \u2714\ufe0f  Dataset "
    "dataset_0357_0 execution finished in 9.83 seconds",
    "\u2714\ufe0f  Dataset train_0357fvH_0 execution finished in 33.84 seconds",
    "2026-12-02 11:21:44,157\tINFO parquet_datasource.py:1416 -- Estimated parquet encoding "
    "ratio is 1.034.",
    "2026-12-02 11:21:44,245\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
]
OUR_LINES = [
    "epoch 1/10 | loss 0.8816 | loc 0.7957 | val mIoU 10.35 %",
    "pretrain epoch 1: contrastive loss 4.092, temperature 0.070, 214 pairs/s",
    "epoch 2/10: 30/57 (53 %) | 0.5 step/s, 8.4 samples/s | elapsed 1:00, ETA 0:54",
]


def test_colour_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert console.colour("done", "green", io.StringIO()) == "done"
    assert console.colour("done", "green", FakeTerminal()) == "\x1b[32mdone\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert console.colour("done", "green", FakeTerminal()) == "done"
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert console.colour("done", "green", FakeTerminal()) == "done"


def test_phase_line_has_no_escape_codes_in_a_file():
    out = io.StringIO()
    console.phase("generating SynthRef", stream=out)
    assert out.getvalue() == "== generating SynthRef\n"


def test_format_duration():
    assert console.format_duration(0) == "0:00"
    assert console.format_duration(75) == "1:15"
    assert console.format_duration(3725) == "1:02:05"


def test_progress_line_formats():
    line = console.progress_line("epoch 2/10", 30, 60, unit="step", elapsed=10.0, samples=480)
    assert line == ("epoch 2/10: 30/60 (50 %) | 3.0 step/s, 48.0 samples/s | elapsed 0:10, "
                    "ETA 0:10")
    assert console.progress_line("validating", 7, None, unit="batch", elapsed=2.0) == \
        "validating: 7 batch | 3.5 batch/s | elapsed 0:02"
    assert console.progress_line("generating", 800, 800, unit="img", elapsed=12.0,
                                 finished=True) == "generating: done, 800 img in 0:12 (66.7 img/s)"
    assert console.progress_line("x", 0, 5, unit="it", elapsed=0.0).endswith("ETA ?")


def test_plain_progress_prints_every_interval_and_a_closing_line():
    out, clock = io.StringIO(), FakeClock()
    with console.Progress("sharding", 10, unit="ref", stream=out, every_s=5.0,
                          clock=clock) as progress:
        for _ in range(10):
            clock.now += 2.0
            progress.update()
    lines = out.getvalue().splitlines()
    # after 6 s (3 refs) and 12 s (6 refs) and 18 s (9 refs); then the closing line at 20 s
    assert lines == [
        "sharding: 3/10 (30 %) | 0.5 ref/s | elapsed 0:06, ETA 0:14",
        "sharding: 6/10 (60 %) | 0.5 ref/s | elapsed 0:12, ETA 0:08",
        "sharding: 9/10 (90 %) | 0.5 ref/s | elapsed 0:18, ETA 0:02",
        "sharding: done, 10 ref in 0:20 (0.5 ref/s)",
    ]


def test_progress_without_final_line_and_disabled():
    out, clock = io.StringIO(), FakeClock()
    progress = console.Progress("epoch 1/2", 4, unit="step", stream=out, every_s=100.0,
                                final_line=False, clock=clock)
    progress.update(4, samples=64)
    progress.close()
    assert out.getvalue() == ""
    assert progress.samples == 64
    silent = console.Progress("x", 3, stream=out, every_s=0.0, enabled=False, clock=clock)
    for _ in range(3):
        silent.update()
    silent.close()
    assert out.getvalue() == "" and silent.done == 3


def test_progress_on_a_terminal_is_a_tqdm_bar():
    out = FakeTerminal()
    with console.Progress("generating SynthRef images", 5, unit="img", stream=out,
                          every_s=0.0) as progress:
        for _ in range(5):
            progress.update()
    text = out.getvalue()
    assert "\r" in text and "5/5" in text and "generating SynthRef images" in text
    assert "ETA" not in text  # no plain lines on a terminal


def test_track_counts_items():
    out = io.StringIO()
    items = list(console.track(range(3), "items", stream=out, every_s=1e9))
    assert items == [0, 1, 2]
    assert out.getvalue().startswith("items: done, 3 it in")


def test_verbose_flag_parsing(monkeypatch):
    import run

    parser = run.build_parser()
    assert parser.parse_args(["train"]).verbose is False
    assert parser.parse_args(["train", "--verbose"]).verbose is True
    assert parser.parse_args(["eval", "--checkpoint", "c", "--verbose"]).verbose is True
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert run.main(["config", "--verbose"]) == 0
    assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1"
    assert run.main(["config"]) == 0
    assert not console.verbose()


@pytest.mark.parametrize("line", RAY_LINES)
def test_ray_noise_is_recognised(line):
    assert console.is_ray_noise(line)


@pytest.mark.parametrize("line", OUR_LINES)
def test_our_lines_are_not_noise(line):
    assert not console.is_ray_noise(line)


def test_worker_lines_are_marked(monkeypatch, capsys):
    monkeypatch.setattr(console, "_forwarded", True)
    console.say("epoch 1/2 | loss 0.5\nsecond line")
    out = capsys.readouterr().out
    assert out == "[gtms] epoch 1/2 | loss 0.5\n[gtms] second line\n"
    assert console.unmark("\x1b[36m[gtms] epoch 1/2\x1b[0m") == "epoch 1/2"
    assert console.unmark("[gtms] epoch 1/2") == "epoch 1/2"
    assert console.unmark("Requesting resources: {'CPU': 1.0} * 2") is None


def test_forwarded_lines_quiet_keeps_ours_and_errors():
    lines = (["[gtms] epoch 1/2 | loss 0.5", "Requesting resources: {'CPU': 1.0} * 2",
              "Setting up process group for: env:// [rank=0, world_size=2]"] + RAY_LINES
             + ["Traceback (most recent call last):", '  File "loop.py", line 3, in f',
                "    raise ValueError('bad')", "ValueError: bad", "after the traceback",
                "[gtms] epoch 2/2 | loss 0.4", "RuntimeError: a worker failed"])
    assert forwarded_lines(lines, quiet=True) == [
        "epoch 1/2 | loss 0.5", "Traceback (most recent call last):",
        '  File "loop.py", line 3, in f', "    raise ValueError('bad')", "ValueError: bad",
        "epoch 2/2 | loss 0.4", "RuntimeError: a worker failed"]


def test_forwarded_lines_of_the_raylet_keep_all_but_noise():
    oom = ("Task was killed due to the node running low on memory. Memory on the node was "
           "7.6GB / 8GB (0.95), which exceeds the memory usage threshold of 0.95.")
    lines = [RAY_LINES[3], oom, "[gtms] ours"]
    assert forwarded_lines(lines, quiet=True, system=True) == [oom, "ours"]
    assert forwarded_lines(lines, quiet=True) == ["ours"]


def test_forwarded_lines_verbose_keeps_everything_unmarked():
    lines = ["[gtms] epoch 1/2", "Requesting resources: {'CPU': 1.0} * 2", RAY_LINES[0]]
    assert forwarded_lines(lines, quiet=False) == [
        "epoch 1/2", "Requesting resources: {'CPU': 1.0} * 2", RAY_LINES[0]]


def test_fd2_capture_collects_what_c_code_writes(capfd):
    capture = console.Fd2Capture()
    for round_ in range(2):   # one file serves every block; each block sees only its lines
        with capture:
            os.write(2, f"Corrupt JPEG data: {round_} extraneous bytes\n".encode())
        assert capture.lines == [f"Corrupt JPEG data: {round_} extraneous bytes"]
    os.write(2, b"after\n")
    capture.close()
    assert capfd.readouterr().err == "after\n"


def test_stderr_filter_drops_noise_written_to_fd_2(capfd):
    noise = RAY_LINES[1] + "\n"
    stderr_filter = console.StderrFilter()
    stderr_filter.install()
    try:
        os.write(2, noise.encode())
        os.write(2, b"error: something real\n")
        os.write(2, b"no newline at the end")
    finally:
        stderr_filter.uninstall()
    err = capfd.readouterr().err
    assert "constructor arguments" not in err
    assert "error: something real\n" in err
    assert err.endswith("no newline at the end")
    assert not stderr_filter.installed
    os.write(2, noise.encode())  # restored: nothing filters any more
    assert "constructor arguments" in capfd.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_local_ray_start_is_quiet_and_lean(monkeypatch, capsys, verbose):
    """What init_ray asks of a local Ray: the worker/watcher settings in the environment of
    the processes it starts, Ray's own driver logging at WARNING unless --verbose, and one line
    of ours that says where Ray's logs are."""
    import logging

    import ray

    from gtms import runtime
    from gtms.config import RayConfig

    calls = []
    env = {k: v for k, v in os.environ.items() if k not in runtime.LOCAL_RAY_SETTINGS}
    env[console.VERBOSE_ENV] = "1" if verbose else "0"
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: None)
    monkeypatch.setattr(runtime, "install_console_filter", lambda **kwargs: None)
    runtime.init_ray(RayConfig())
    (kwargs,) = calls
    assert kwargs["log_to_driver"] is True
    assert kwargs["logging_level"] == (logging.INFO if verbose else logging.WARNING)
    for key, value in runtime.LOCAL_RAY_SETTINGS.items():
        assert env[key] == value
    assert env["RAY_COLOR_PREFIX"] == "0"  # captured stdout is not a terminal
    out = capsys.readouterr().out
    assert out.startswith("started a local Ray (") and "Ray's own logs:" in out
    assert ("--verbose shows them here" in out) is not verbose
