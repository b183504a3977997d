"""procfs.ProcFiles: /proc/PID/stat and /proc/PID/maps kept open between rounds must read
what opening them afresh reads, follow an exec, and never describe another process.
Our own children: no root needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import wait_for

from ckptd.kernel import procfs

EXEC_ON_LINE = "import os, sys; sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '60'])"


def test_kept_files_read_what_a_fresh_open_reads() -> None:
    p = subprocess.Popen(["sleep", "60"])
    files = procfs.ProcFiles(p.pid)
    try:
        # Asleep in nanosleep: past the dynamic loader, so its mappings stay put.
        assert wait_for(lambda: procfs.read_stat_fields(p.pid)[1:3] == ["sleep", "S"])
        for _ in range(3):  # the first call opens, the later ones pread the kept fds
            fields = files.stat_fields()
            assert fields[:2] == [str(p.pid), "sleep"]
            assert fields[21] == procfs.read_stat_fields(p.pid)[21]  # start time
            assert int(fields[procfs.STAT_NUM_THREADS]) == 1
            assert files.maps() == procfs.read_maps(p.pid)
    finally:
        files.close()
        p.kill()
        p.wait()


def test_kept_maps_follow_an_exec() -> None:
    p = subprocess.Popen([sys.executable, "-c", EXEC_ON_LINE], stdin=subprocess.PIPE)
    files = procfs.ProcFiles(p.pid)
    try:
        assert wait_for(lambda: any(m.path and "python" in m.path for m in files.maps()))
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.flush()
        # The kept maps file was opened on the interpreter's address space, which the
        # exec ended: it reads empty, and ProcFiles opens the file again.
        assert wait_for(lambda: files.stat_fields()[1:3] == ["sleep", "S"])
        maps = files.maps()
        assert maps == procfs.read_maps(p.pid)
        assert any(m.path == os.path.realpath("/bin/sleep") for m in maps)
        assert not any(m.path and "python" in m.path for m in maps)
    finally:
        files.close()
        p.kill()
        p.wait()


def test_kept_files_of_a_reaped_process_say_it_is_gone() -> None:
    p = subprocess.Popen(["sleep", "60"])
    files = procfs.ProcFiles(p.pid)
    try:
        files.stat_fields()
        files.maps()
        p.kill()
        assert wait_for(lambda: files.stat_fields()[2] == "Z")  # a zombie: still readable
        p.wait()
        # Reaped: the kept stat file fails with ESRCH, and the PID is looked up again by
        # path, which finds nothing (or, were the PID reused, the new process).
        with pytest.raises(FileNotFoundError):
            files.stat_fields()
        with pytest.raises(FileNotFoundError):
            files.maps()
    finally:
        files.close()
