"""Run model-generated Python in a separate, confined process.

Generated code never runs in our process. Each call starts ``python -I`` in a fresh temporary
directory (its cwd, ``HOME`` and ``TMPDIR``; the environment is otherwise empty) and confines it in
layers, each chosen because it works where the previous one does not:

* **rlimits** (set by a trusted bootstrap before the sample's first line): CPU seconds, address
  space (``RLIMIT_AS``), file size (``RLIMIT_FSIZE``, which also caps what the sample can print:
  stdout/stderr are files), open files, no core dumps, and ``RLIMIT_NPROC``.
* **An unprivileged, unused uid** when we are root. The kernel ignores ``RLIMIT_NPROC`` for root,
  and root may write and delete any file, so rlimits alone stop neither a fork bomb nor
  ``rm -rf`` of an absolute path. As a fresh uid (one per call) the sample owns nothing but its
  directory, ordinary permissions stop it writing outside, ``RLIMIT_NPROC`` counts only its own
  processes, and afterwards ``kill(-1)`` sent *as that uid* ends every process it left behind.
* **Namespaces** (``unshare --user --map-root-user --net --pid --fork --kill-child``, util-linux):
  a network namespace with only a downed loopback device (no network at all), and a pid namespace
  whose processes all die with its first process, even ones that escaped our process group with
  ``setsid``. A user namespace lets an unprivileged uid create the other two.
* **Landlock** (Linux >= 5.13, unprivileged, applied by the bootstrap through raw syscalls: Python
  has no binding): writes, deletions and renames are allowed only beneath the sample's directory,
  whatever the uid and file modes; from ABI 4, TCP bind/connect are denied; from ABI 6, signals to
  processes outside the sandbox are denied. This is what protects files when we are not root.

The interpreter is ours where the fresh uid can run it, else the system ``python3`` (a private home such
as pyenv's under ``/root`` is closed to other uids); samples need only the standard library.
seccomp is not used (no maintained binding in the environment). Which layers are active on this
machine is reported by :func:`isolation`; :func:`run_python` raises :class:`SandboxUnavailable` unless
a layer that keeps writes inside the directory and one that cuts the network are active
(``require_confinement``). Callers use it sequentially or from a few threads; every call has its own uid
and directory.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The trusted first lines of every sandboxed process: limits, then Landlock, then the sample.
_BOOTSTRAP = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["landlock"]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(444, None, 0, 1)
    if abi >= 1:
        fs = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13))
        fs |= ((1 << 13) if abi >= 2 else 0) | ((1 << 14) if abi >= 3 else 0)
        net = 3 if abi >= 4 else 0
        scoped = 3 if abi >= 6 else 0
        attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
        if ruleset < 0:
            raise SystemExit("sandbox: landlock_create_ruleset failed")

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        for path, access in ((cfg["workdir"], fs), ("/dev", 1 << 1)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = PathBeneath(access, fd)
            if libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) != 0:
                raise SystemExit("sandbox: landlock_add_rule failed")
            os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.syscall(446, ruleset, 0) != 0:
            raise SystemExit("sandbox: landlock_restrict_self failed")
        os.close(ruleset)
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    code = compile(f.read(), "main.py", "exec")
exec(code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
'''

_UNSHARE = ("--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")
# Unused uids for sandboxed processes (far above any distribution's allocated ranges).
_UID_RANGE = (1 << 24, 1 << 30)


class SandboxUnavailable(RuntimeError):
    """The machine cannot confine generated code (see :func:`isolation`)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``cpu_s`` defaults to the wall limit (both whole seconds for the CPU rlimit)."""

    wall_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    max_processes: int = 16
    file_size_mb: int = 16
    max_open_files: int = 64
    output_chars: int = 4000  # of stdout/stderr kept in the result

    def __post_init__(self) -> None:
        for name in ("wall_s", "memory_mb", "max_processes", "file_size_mb", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None when it was killed at the wall limit
    timed_out: bool
    stdout: str
    stderr: str
    wall_s: float
    layers: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Isolation:
    """The confinement layers available on this machine."""

    as_other_uid: bool  # we are root: samples run as a fresh unprivileged uid
    namespaces: bool  # network and pid namespaces (unshare)
    landlock_abi: int  # 0 when Landlock is unavailable
    python: str  # the interpreter samples run with

    @property
    def layers(self) -> tuple[str, ...]:
        out = ["rlimits", "own-session"]
        if self.as_other_uid:
            out.append("fresh-uid")
        if self.namespaces:
            out += ["netns", "pidns"]
        if self.landlock_abi:
            out.append(f"landlock-abi{self.landlock_abi}")
        return tuple(out)

    @property
    def confines_writes(self) -> bool:
        return self.as_other_uid or self.landlock_abi > 0

    @property
    def cuts_network(self) -> bool:
        # Without a network namespace, Landlock (ABI >= 4) denies TCP; UDP stays open.
        return self.namespaces or self.landlock_abi >= 4


def _landlock_abi() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, int(libc.syscall(444, None, 0, 1)))  # landlock_create_ruleset(NULL, 0, VERSION)


def _fresh_uid() -> int:
    return _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])


def _try(cmd: list[str], uid: int | None) -> bool:
    try:
        kwargs = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        done = subprocess.run(cmd, capture_output=True, timeout=30, cwd="/", env={}, **kwargs)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once which layers work here (a few short subprocesses)."""
    as_other_uid = hasattr(os, "geteuid") and os.geteuid() == 0
    uid = _fresh_uid() if as_other_uid else None
    # A fresh uid cannot read an interpreter under a private home (e.g. pyenv under /root): use the
    # first candidate it can run. Samples need only the standard library.
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or ""]
    python = next((c for c in dict.fromkeys(candidates) if c and _try([c, "-I", "-c", "pass"], uid)), None)
    if python is None:
        raise SandboxUnavailable("sandbox: no Python interpreter this machine's sandbox uid can run")
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    namespaces = bool(unshare) and _try([unshare, *_UNSHARE, python, "-I", "-c", "pass"], uid)
    return Isolation(as_other_uid, namespaces, _landlock_abi(), python)


def _own_processes() -> int:
    uid = os.getuid()
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                count += len(os.listdir(entry / "task"))  # RLIMIT_NPROC counts threads
        except OSError:
            continue
    return count


def _kill_uid(uid: int) -> None:
    # kill(-1) as the sandbox uid reaches exactly that uid's processes (and nothing of ours).
    code = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass"
    subprocess.run([isolation().python, "-I", "-c", code], user=uid, group=uid, extra_groups=[],
                   cwd="/", env={}, timeout=30, check=False, capture_output=True)


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(code: str, limits: SandboxLimits | None = None, *, require_confinement: bool = True) -> RunResult:
    """Run ``code`` as ``main.py`` in a throwaway directory under every available layer (module doc).

    Returns the exit status, whether the wall limit killed it, and the first ``output_chars`` of
    stdout/stderr. Nothing is raised for a failing, crashing or hostile sample: it scores as not
    :attr:`RunResult.passed`. ``require_confinement`` (default) raises :class:`SandboxUnavailable` where
    neither a fresh uid (root) nor Landlock keeps writes inside the directory, or neither a network
    namespace nor Landlock ABI >= 4 cuts the network.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    limits = limits or SandboxLimits()
    iso = isolation()
    if require_confinement and not (iso.confines_writes and iso.cuts_network):
        raise SandboxUnavailable(f"sandbox: this machine offers only {', '.join(iso.layers)}, which cannot keep "
                                 "generated code's writes inside its directory and off the network")
    uid = _fresh_uid() if iso.as_other_uid else None
    cpu = int(max(1, round(limits.cpu_s if limits.cpu_s is not None else limits.wall_s)))
    mb = 1 << 20
    rlimits = {"RLIMIT_CPU": cpu, "RLIMIT_AS": limits.memory_mb * mb, "RLIMIT_FSIZE": limits.file_size_mb * mb,
               "RLIMIT_NOFILE": limits.max_open_files, "RLIMIT_CORE": 0}
    # Counted per real uid: a fresh uid has none yet; our own (non-root) uid already runs some, which the
    # limit must leave room for.
    rlimits["RLIMIT_NPROC"] = limits.max_processes + (0 if uid is not None else _own_processes())
    # The work directory and a private directory for the output files, removed afterwards.
    outer = Path(tempfile.mkdtemp(prefix="onpolicy-sandbox-"))
    work = outer / "work"
    work.mkdir()
    (work / "main.py").write_text(code, encoding="utf-8")
    (work / "bootstrap.py").write_text(_BOOTSTRAP, encoding="utf-8")
    if uid is not None:
        # outer stays root's 0700 dir, so the sample cannot reach the output files by path; work is its own.
        os.chmod(outer, 0o711)
        for path in (work, work / "main.py", work / "bootstrap.py"):
            os.chown(path, uid, uid)
    cfg = json.dumps({"rlimits": rlimits, "landlock": iso.landlock_abi > 0, "workdir": str(work)})
    cmd = [iso.python, "-I", "-B", "bootstrap.py", cfg]
    if iso.namespaces:
        cmd = [shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin") or "unshare", *_UNSHARE, *cmd]
    env = {"HOME": str(work), "TMPDIR": str(work), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    start = time.perf_counter()
    timed_out = False
    try:
        with open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, **ids)
            try:
                returncode: int | None = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            finally:
                # The whole session, then (pid namespace) everything in it dies with its first process,
                # then (fresh uid) anything else that uid still runs.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                if uid is not None:
                    _kill_uid(uid)
        wall = time.perf_counter() - start
        return RunResult(returncode, timed_out, _read(outer / "stdout", limits.output_chars),
                         _read(outer / "stderr", limits.output_chars), round(wall, 3), iso.layers)
    finally:
        shutil.rmtree(outer, ignore_errors=True)
