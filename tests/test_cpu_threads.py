"""Thread count and OpenMP wait policy: set before torch loads, overridable, never below one thread."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from onpolicy_lib import cpu_threads


def test_the_passive_wait_policy_is_set_on_import_unless_the_user_chose_one():
    code = "import os, onpolicy_lib; print(os.environ['OMP_WAIT_POLICY'], os.environ['KMP_BLOCKTIME'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_WAIT_POLICY": "ACTIVE"}).stdout.split()
    assert out == ["ACTIVE", "0"]
    env: dict[str, str] = {}
    cpu_threads.set_wait_policy(env)
    assert env == cpu_threads.PASSIVE_WAIT


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
