"""Thread count and OpenMP wait policy: set before torch loads, overridable, never below one thread."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from onpolicy_lib import cpu_threads


def test_a_wait_policy_is_set_on_import_unless_the_user_chose_one():
    code = "import os, onpolicy_lib; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"

    def imported(**env: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PATH": "", **env}).stdout.split()

    assert imported(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "None"]  # the user's choice wins
    assert imported(ONPOLICY_QUANT_WAIT="passive") == ["PASSIVE", "None"]
    assert imported(ONPOLICY_QUANT_WAIT="runtime") == ["None", "None"]
    assert imported(ONPOLICY_QUANT_WAIT="bounded") == ["None", str(cpu_threads.SPIN_COUNT)]


def test_auto_waits_passively_only_beside_a_busy_core(monkeypatch):
    for busy, expected in ((False, cpu_threads.BOUNDED_SPIN), (True, cpu_threads.PASSIVE_WAIT)):
        monkeypatch.setattr(cpu_threads, "others_busy", lambda busy=busy: busy)
        env: dict[str, str] = {}
        assert cpu_threads.set_wait_policy(env) == ("passive" if busy else "bounded")
        assert env == expected
    env = {"GOMP_SPINCOUNT": "5"}
    assert cpu_threads.set_wait_policy(env) == "user" and env == {"GOMP_SPINCOUNT": "5"}
    with pytest.raises(ValueError, match="ONPOLICY_QUANT_WAIT accepts auto, bounded, passive, runtime; got 'spin'"):
        cpu_threads.set_wait_policy({"ONPOLICY_QUANT_WAIT": "spin"})


def test_a_busy_loop_is_seen_as_another_process_on_a_core():
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import os
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(loop.pid, {cpu})
        assert cpu_threads.busy_cores({cpu}, seconds=0.5) == 1
    finally:
        loop.kill()
        loop.wait()


def test_thread_count_from_the_usable_cores_or_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert 1 <= cpu_threads.usable_cores() <= len(__import__("os").sched_getaffinity(0))
        monkeypatch.setenv(cpu_threads.THREADS_ENV, "1")
        assert cpu_threads.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(cpu_threads.THREADS_ENV, "available")
        assert cpu_threads.configure_threads() >= 1
        monkeypatch.setenv(cpu_threads.THREADS_ENV, "many")
        with pytest.raises(ValueError, match="ONPOLICY_QUANT_THREADS must be a positive number"):
            cpu_threads.configure_threads()
    finally:
        torch.set_num_threads(before)
