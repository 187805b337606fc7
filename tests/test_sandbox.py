"""The sandbox against hostile samples: each is stopped, scored failed, and leaves everything outside intact."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from onpolicy_lib import sandbox
from onpolicy_lib.sandbox import Isolation, SandboxLimits, SandboxUnavailable, isolation, run_python

# Short limits keep the hostile samples fast.
LIMITS = SandboxLimits(wall_s=2.0, memory_mb=256, max_processes=8, file_size_mb=1)


@pytest.fixture(scope="module")
def iso():
    found = isolation()
    if not (found.confines_writes and found.cuts_network):
        pytest.skip(f"only {found.layers} here: the sandbox refuses to run")
    return found


def _victim(tmp_path: Path) -> Path:
    # World-writable on purpose: only the sandbox's confinement, not file modes, may protect it.
    tmp_path.chmod(0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    victim.chmod(0o666)
    return victim


def test_runs_code_in_its_own_directory_and_process(iso):
    code = f"import os\nprint(os.getcwd() == os.environ['HOME'], os.getpid() != {os.getpid()})"
    result = run_python(code, LIMITS)
    assert result.passed and result.stdout.split() == ["True", "True"]
    assert "rlimits" in result.layers


def test_failing_and_malformed_code_fail(iso):
    assert not run_python("assert 1 == 2", LIMITS).passed
    bad = run_python("def f(:\n", LIMITS)
    assert not bad.passed and "SyntaxError" in bad.stderr


def test_infinite_loop_is_stopped(iso):
    start = time.perf_counter()
    result = run_python("while True:\n    pass", LIMITS)
    assert not result.passed and time.perf_counter() - start < LIMITS.wall_s + 5


def test_unbounded_allocation_is_stopped(iso):
    result = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", LIMITS)
    assert not result.passed


def test_fork_bomb_is_stopped_and_leaves_nothing(iso):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_python(code, LIMITS)
    assert not result.passed
    time.sleep(0.3)
    # No process outlives the run (a fork-bomb child would still be running the same code).
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "bootstrap.py" not in ps


def test_escaped_child_is_killed(iso, tmp_path):
    marker = tmp_path / "late"
    tmp_path.chmod(0o777)
    code = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.5)\n"
            f"    open({str(marker)!r}, 'w').write('alive')\nprint('parent done')")
    assert run_python(code, LIMITS).passed
    time.sleep(2.0)
    assert not marker.exists()


def test_large_file_and_output_are_capped(iso):
    assert not run_python("open('f', 'wb').write(b'x' * (4 << 20))", LIMITS).passed
    flood = run_python("while True:\n    print('x' * 1000)", LIMITS)
    assert not flood.passed and len(flood.stdout) <= LIMITS.output_chars


def test_cannot_overwrite_or_delete_outside(iso, tmp_path):
    victim = _victim(tmp_path)
    for code in (f"open({str(victim)!r}, 'w').write('pwned')",
                 f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
                 f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')"):
        assert not run_python(code, LIMITS).passed, code
    assert victim.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_no_network(iso):
    code = "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 53))"
    assert not run_python(code, LIMITS).passed
    assert not run_python("import socket\nsocket.socket().bind(('127.0.0.1', 0))", LIMITS).passed \
        or iso.namespaces  # in a fresh network namespace a local bind is harmless


def test_refuses_to_run_unconfined(monkeypatch):
    bare = Isolation(as_other_uid=False, namespaces=False, landlock_abi=0, python="python3")
    monkeypatch.setattr(sandbox, "isolation", lambda: bare)
    with pytest.raises(SandboxUnavailable, match="cannot keep"):
        run_python("print(1)", LIMITS)


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=0)
