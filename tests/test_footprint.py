"""benchmarks/footprint.py: the process tree, its PSS and the report (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks import footprint

CHILD = "import time; x = bytearray(64 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"


def test_tree_pss_and_kinds_of_a_child():
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        assert child.pid in footprint.process_tree(os.getpid())
        sample = footprint.Footprint(os.getpid())
        for _ in range(50):  # until the child has touched its 64 MB
            sizes = footprint.pss_kib(child.pid)
            if sizes and sizes[0] > 60 * 1024:
                break
            time.sleep(0.1)
        assert sample.sample()
        assert sample.peak_processes >= 2
        assert sample.peak_kib >= footprint.pss_kib(child.pid)[0] > 60 * 1024
        assert sample.driver_peak_kib > 0
        kinds = sample.peak_kinds
        assert sum(n for n, _, _ in kinds.values()) == sample.peak_processes
        report = sample.report()
        assert "peak summed PSS" in report and "summed / driver" in report
    finally:
        child.kill()
        child.wait()
    assert footprint.pss_kib(child.pid) is None


def test_process_kind_names_ray_titles_and_scripts():
    assert footprint.process_kind(os.getpid()).startswith("python")
    assert footprint.process_kind(2**22 + 12345) == "?"


def test_main_runs_a_command_and_reports(tmp_path, capsys):
    console = tmp_path / "console.txt"
    rc = footprint.main(["--interval", "0.05", "--console", str(console), "--",
                         sys.executable, "-c", "import time; print('hello'); time.sleep(0.3)"])
    out = capsys.readouterr().out
    assert rc == 0
    assert console.read_text() == "hello\n"
    assert "peak summed PSS" in out and "peak processes:    1" in out


def test_main_passes_the_exit_status_on():
    assert footprint.main(["--interval", "0.05", "--", sys.executable, "-c",
                           "raise SystemExit(3)"]) == 3
