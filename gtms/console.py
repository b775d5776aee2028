"""What the commands show on the console: our lines, progress, and how much of Ray gets through.

* :func:`say` prints one of our lines; :func:`phase` the line that opens a phase ("== what it
  does"). Colour only when the stream is a terminal and ``NO_COLOR`` is unset.
* :class:`Progress`: a tqdm bar on a terminal; elsewhere (a file, a pipe, a Ray worker whose
  output the driver forwards) a plain line every ``$GTMS_PROGRESS_EVERY_S`` seconds (15) with
  step/total, rate, samples/s and ETA (:func:`progress_line`), and a closing line.
* Verbosity: quiet by default: the console shows our lines, and Ray's stay in its log folder
  (the first line of a Ray run names it); ``run.py COMMAND --verbose`` shows them too. The
  choice is kept in ``$GTMS_VERBOSE`` for :mod:`gtms.runtime`, which starts Ray.
* Quiet, three filters: in a Ray worker :func:`say` marks our lines (:func:`forward_to_driver`)
  and the driver prints only marked lines and errors of what Ray forwards
  (:func:`gtms.runtime.forwarded_lines`); Ray's Python loggers in the driver log at WARNING;
  :data:`STDERR_FILTER` drops the known noise (:data:`RAY_NOISE`) that Ray's C++ code writes
  straight to file descriptor 2.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

VERBOSE_ENV = "GTMS_VERBOSE"
PROGRESS_EVERY_ENV = "GTMS_PROGRESS_EVERY_S"   # plain progress lines: seconds between two
DEFAULT_EVERY_S = 15.0
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
COLOURS = {"bold": "1", "dim": "2", "green": "32", "yellow": "33", "red": "31", "cyan": "36"}

# Ray's lines on a healthy run (Ray 2.60), matched after ANSI codes are removed; each is
# harmless and each was on the console of `python run.py train` before it was quiet.
RAY_NOISE = tuple(re.compile(p) for p in (
    # Ray Train's PreemptionWatcher and Ray Data's MapWorker actors (C++ core worker, ERROR)
    r"\bcore_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    r"object store and max_restarts > 0",
    r"PYTHON worker processes have been started",          # raylet start-up concurrency warning
    r"ExecutionOptions\.exclude_resources is deprecated",   # Ray Train's own default ingest
    r"RayDeprecationWarning",
    r"Dataset \S+ execution finished in",                  # Ray Data, every execution
    r"Registered dataset logger for dataset",
    r"Progress bars disabled\. To enable",
    r"Starting execution of Dataset",
    r"Execution plan of Dataset",
    r"^\s*warnings\.warn\(\s*$",                            # the source line under a warning
    r"\bINFO\b .* -- ",                                    # Ray's INFO log lines
))


FORWARD_MARK = "[gtms] "   # our lines in a Ray worker's output (the driver removes it)
ERROR_LINE = re.compile(r"\w*(Error|Exception)\b|\b(ERROR|FATAL|CRITICAL)\b"
                        r"|^\[[^]]* [EF] \d+ \d+\]")   # the last: Ray's C++ error lines
_forwarded = False


def forward_to_driver() -> None:
    """This process is a Ray worker: mark what :func:`say` prints, so that the driver's quiet
    console (:func:`gtms.runtime.forwarded_lines`) shows it among Ray's own lines."""
    global _forwarded
    _forwarded = True


def unmark(line: str) -> str | None:
    """A forwarded line without its mark, or None when it is not one of ours."""
    plain = strip_ansi(line)
    return plain[len(FORWARD_MARK):] if plain.startswith(FORWARD_MARK) else None


def looks_like_error(line: str) -> bool:
    return bool(ERROR_LINE.search(strip_ansi(line)))


def set_verbose(on: bool) -> None:
    """Record ``--verbose`` for this process and the Ray workers it starts."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def colour(text: str, name: str, stream: TextIO | None = None) -> str:
    """``text`` in colour ``name`` (see ``COLOURS``) on a terminal; unchanged elsewhere."""
    if not is_terminal(stream) or os.environ.get("NO_COLOR"):
        return text
    return f"\x1b[{COLOURS[name]}m{text}\x1b[0m"


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def say(text: str, *, stream: TextIO | None = None) -> None:
    """One of our lines, flushed at once; marked in a Ray worker (see :func:`forward_to_driver`)."""
    if _forwarded:
        text = "\n".join(FORWARD_MARK + part for part in text.split("\n"))
    print(text, file=stream or sys.stdout, flush=True)


def phase(text: str, *, stream: TextIO | None = None) -> None:
    """The line that opens a phase, saying what it does: ``== generating SynthRef …``."""
    say(colour(f"== {text}", "bold", stream or sys.stdout), stream=stream)


def is_ray_noise(line: str) -> bool:
    """True for a line that :data:`RAY_NOISE` drops from a quiet console."""
    plain = strip_ansi(line)
    return any(p.search(plain) for p in RAY_NOISE)


class StderrFilter:
    """Drop :data:`RAY_NOISE` lines written to this process's file descriptor 2, whoever
    writes them (Ray's C++ core worker logs there directly, past ``sys.stderr``).

    ``install()`` points fd 2 at a pipe that a thread reads line by line and copies, less the
    noise, to the original stderr; ``uninstall()`` (also at exit) restores fd 2 and copies what
    is left, so a traceback printed at exit still appears.
    """

    def __init__(self):
        self._saved: int | None = None
        self._thread = None

    @property
    def installed(self) -> bool:
        return self._saved is not None

    def install(self) -> None:
        import atexit
        import threading

        if self.installed:
            return
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end, self._saved),
                                        name="gtms-stderr-filter", daemon=True)
        self._thread.start()
        atexit.register(self.uninstall)

    @staticmethod
    def _pump(read_end: int, out: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                if not is_ray_noise(raw.decode(errors="replace")):
                    os.write(out, raw)

    def uninstall(self) -> None:
        if not self.installed:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        saved, self._saved = self._saved, None
        os.dup2(saved, 2)  # the pipe's last writer in this process is gone: the pump ends
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        os.close(saved)


STDERR_FILTER = StderrFilter()


class Fd2Capture:
    """Collect what is written to file descriptor 2 inside a ``with`` block instead of showing
    it: C libraries (libjpeg's "Corrupt JPEG data" warnings) write there directly, past
    ``sys.stderr``. After the block, :attr:`lines` holds what it wrote. One temporary file
    serves every block (cheap enough to wrap each image decode); not for threads that write
    to stderr meanwhile. Works under :data:`STDERR_FILTER` (fd 2 is restored to its pipe)."""

    def __init__(self):
        self.lines: list[str] = []
        self._file = None
        self._saved: int | None = None

    def __enter__(self) -> Fd2Capture:
        import tempfile

        if self._file is None:
            self._file = tempfile.TemporaryFile()
        self._file.seek(0)
        self._file.truncate()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        saved, self._saved = self._saved, None
        os.dup2(saved, 2)
        os.close(saved)
        self._file.seek(0)
        self.lines = self._file.read().decode(errors="replace").splitlines()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05`` (as tqdm writes them)."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(desc: str, done: int, total: int | None, *, unit: str, elapsed: float,
                  samples: int | None = None, finished: bool = False,
                  postfix: str = "") -> str:
    """The plain progress line: ``desc: 30/63 (48 %) | 3.1 step/s, 49.6 samples/s |
    elapsed 0:09, ETA 0:10``; a finished one reads ``desc: done, 63 step in 0:20 (…)``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    rates = f"{rate:.1f} {unit}/s"
    if samples is not None:
        rates += f", {samples / elapsed if elapsed > 0 else 0.0:.1f} samples/s"
    tail = f" | {postfix}" if postfix else ""
    if finished:
        return f"{desc}: done, {done} {unit} in {format_duration(elapsed)} ({rates}){tail}"
    if total:
        eta = format_duration((total - done) / rate) if rate > 0 else "?"
        return (f"{desc}: {done}/{total} ({100 * done / total:.0f} %) | {rates} | elapsed "
                f"{format_duration(elapsed)}, ETA {eta}{tail}")
    return f"{desc}: {done} {unit} | {rates} | elapsed {format_duration(elapsed)}{tail}"


def progress_every_s() -> float:
    """Seconds between two plain progress lines (``$GTMS_PROGRESS_EVERY_S``, default 15)."""
    return float(os.environ.get(PROGRESS_EVERY_ENV, DEFAULT_EVERY_S))


class Progress:
    """Progress of one phase: a tqdm bar on a terminal, plain lines elsewhere.

    ``update(n, samples=k)`` after each step; ``close()`` (or leaving the ``with`` block)
    ends it with a closing line when ``final_line`` (the bar's last state on a terminal).
    ``enabled=False`` shows nothing (e.g. on every Ray worker but rank 0).
    """

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "it",
                 stream: TextIO | None = None, every_s: float | None = None,
                 enabled: bool = True, final_line: bool = True, clock=time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stdout
        self.every_s = every_s if every_s is not None else progress_every_s()
        self.enabled, self.final_line, self.clock = enabled, final_line, clock
        self.done = 0
        self.samples: int | None = None
        self.postfix = ""
        self.start = self.last = clock()
        self.closed = False
        self._bar = None
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                             leave=final_line)

    def update(self, n: int = 1, *, samples: int | None = None) -> None:
        self.done += n
        if samples is not None:
            self.samples = (self.samples or 0) + samples
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s and (self.total is None or self.done < self.total):
            self.last = now
            say(self.line(now), stream=self.stream)

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def line(self, now: float | None = None, *, finished: bool = False) -> str:
        elapsed = (now if now is not None else self.clock()) - self.start
        return progress_line(self.desc, self.done, self.total, unit=self.unit, elapsed=elapsed,
                             samples=self.samples, finished=finished, postfix=self.postfix)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.final_line:
            say(self.line(finished=True), stream=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(items: Iterable, desc: str, total: int | None = None, **kwargs) -> Iterator:
    """``items`` with a :class:`Progress` of one step per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, **kwargs) as progress:
        for item in items:
            yield item
            progress.update()
