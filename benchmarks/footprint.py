"""Memory and process footprint of a run: summed PSS over its whole process tree.

    python -m benchmarks.footprint                                   # the default `run.py train`
    python -m benchmarks.footprint --console out.txt -- python run.py train --set train.epochs=2
    python -m benchmarks.footprint --attach PID                      # a run started elsewhere

A local Ray cluster lives in the process tree of the driver that started it (GCS, raylet,
dashboard, log monitor, the workers the raylet forks), so ``/usr/bin/time -v`` (the driver's own
peak RSS) misses most of it, and summing RSS counts shared pages (torch's libraries, the object
store) once per process. This samples every ``--interval`` seconds, for every process of the
tree, the proportional set size (PSS, ``/proc/PID/smaps_rollup``: shared pages divided among the
processes that map them) and prints:

* peak summed PSS, the process count then, and the peak process count;
* the mean summed PSS over the run, the wall time and the peak 1-minute load average;
* at the peak, PSS per kind of process (Ray names its processes ``ray::IDLE``,
  ``ray::RayTrainWorker…``, …), which is where waste shows (idle workers, extra actors);
* the ratio of peak summed PSS to the driver's own peak PSS (the reference: what a one-process
  measurement sees), measured in the same sampling.

With a command the run's console (stdout and stderr, merged) goes to ``--console`` (default:
passed through). Linux only (``/proc``). Start Ray runs under ``flock /tmp/ray.lock`` on shared
machines. Not a test: the figures depend on the machine (printed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMMAND = [sys.executable, str(REPO / "run.py"), "train"]


def children_map() -> dict[int, list[int]]:
    """Every live process's children, from ``/proc/PID/stat``."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The name (field 2) is in parentheses and may hold spaces: split after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children[ppid].append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now."""
    children, out, todo = children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def pss_kib(pid: int) -> tuple[int, int] | None:
    """(PSS, its shared-memory part) of ``pid`` in KiB, or None once it is gone. The shared
    memory part is mostly Ray's object store (``/dev/shm``), mapped by the processes that read
    objects from it."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    total = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
    shmem = re.search(r"^Pss_Shmem:\s+(\d+) kB", text, re.MULTILINE)
    if not total:
        return None
    return int(total.group(1)), int(shmem.group(1)) if shmem else 0


def process_kind(pid: int) -> str:
    """A short label: Ray's process title (``ray::IDLE``, ``ray::RayTrainWorker``), the Ray
    daemon's name (``raylet``, ``gcs_server``), or the program and its first argument."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    argv = [a.decode(errors="replace") for a in argv if a]
    if not argv:
        return "?"
    first = argv[0]
    if first.startswith("ray::"):  # "ray::RayTrainWorker.train_fn" -> "ray::RayTrainWorker"
        return first.split()[0].split(".")[0]
    name = Path(first.split()[0]).name
    if name.startswith("python"):
        script = next((a for a in argv[1:] if not a.startswith("-")), "")
        return f"python {Path(script).name}" if script else name
    return name


@dataclass
class Footprint:
    """Samples of one process tree."""

    root: int
    samples: int = 0
    peak_kib: int = 0
    peak_processes: int = 0       # processes at the PSS peak
    max_processes: int = 0
    peak_kinds: dict[str, list[int]] = field(default_factory=dict)  # kind -> [n, KiB, shm KiB]
    peak_shmem_kib: int = 0
    driver_peak_kib: int = 0
    total_kib: int = 0            # summed over samples, for the mean
    peak_load: float = 0.0
    started: float = field(default_factory=time.time)
    ended: float = 0.0

    def sample(self) -> bool:
        """One sample; False once the root is gone."""
        per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        total = shmem = count = 0
        for pid in process_tree(self.root):
            sizes = pss_kib(pid)
            if sizes is None:
                continue
            kib, shm = sizes
            total, shmem, count = total + kib, shmem + shm, count + 1
            kind = per_kind[process_kind(pid)]
            kind[0], kind[1], kind[2] = kind[0] + 1, kind[1] + kib, kind[2] + shm
            if pid == self.root:
                self.driver_peak_kib = max(self.driver_peak_kib, kib)
        if count == 0:
            return False
        self.samples += 1
        self.total_kib += total
        self.max_processes = max(self.max_processes, count)
        self.peak_load = max(self.peak_load, os.getloadavg()[0])
        if total > self.peak_kib:
            self.peak_kib, self.peak_processes, self.peak_shmem_kib = total, count, shmem
            self.peak_kinds = dict(per_kind)
        return True

    def report(self) -> str:
        mb = 1024
        wall = (self.ended or time.time()) - self.started
        lines = [
            f"peak summed PSS:   {self.peak_kib / mb:.0f} MB in {self.peak_processes} processes "
            f"({self.peak_shmem_kib / mb:.0f} MB of it shared memory: Ray's object store)",
            f"peak processes:    {self.max_processes}",
            f"mean summed PSS:   {self.total_kib / max(self.samples, 1) / mb:.0f} MB over "
            f"{self.samples} samples, wall {wall:.0f} s",
            f"peak load average: {self.peak_load:.1f} (1 min) on {os.cpu_count()} CPUs",
            f"driver peak PSS:   {self.driver_peak_kib / mb:.0f} MB; summed / driver = "
            f"{self.peak_kib / max(self.driver_peak_kib, 1):.1f}x",
            "at the peak, per kind of process (count, PSS, of which shared memory):",
        ]
        for kind, (n, kib, shm) in sorted(self.peak_kinds.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"  {kind[:40]:<40} {n:>3}  {kib / mb:7.0f} MB  {shm / mb:6.0f} MB")
        return "\n".join(lines)


def watch(footprint: Footprint, interval: float, alive) -> None:
    while alive() and footprint.sample():
        time.sleep(interval)
    footprint.ended = time.time()


def run_command(command: list[str], console: str | None, interval: float) -> tuple[int, Footprint]:
    out = open(console, "w") if console else None  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT
                                if out else None)
        footprint = Footprint(proc.pid)
        watch(footprint, interval, lambda: proc.poll() is None)
        return proc.wait(), footprint
    finally:
        if out:
            out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attach", type=int, metavar="PID",
                        help="sample a running process tree instead of starting a command")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S")
    parser.add_argument("--console", metavar="FILE",
                        help="write the command's stdout+stderr here (default: pass through)")
    parser.add_argument("command", nargs="*",
                        help="after '--': the command to run (default: python run.py train)")
    args = parser.parse_args(argv)
    if args.attach:
        if not Path(f"/proc/{args.attach}").exists():
            parser.error(f"--attach: no process {args.attach}")
        footprint = Footprint(args.attach)
        watch(footprint, args.interval, lambda: Path(f"/proc/{args.attach}").exists())
        rc = 0
    else:
        rc, footprint = run_command(args.command or DEFAULT_COMMAND, args.console, args.interval)
    what = f"PID {args.attach}" if args.attach else " ".join(args.command or DEFAULT_COMMAND)
    print(f"\n=== footprint of {what} ===")
    print(footprint.report())
    if rc:
        print(f"the command exited with status {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
