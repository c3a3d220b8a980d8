"""Running untrusted Python (a model's completion and its tests) in a sandboxed subprocess.

What the sandbox relies on, layer by layer:
- a fresh interpreter (``python -I``: no user site, no PYTHONPATH) with an empty environment,
  its working directory, HOME and TMPDIR a new temporary directory removed afterwards;
- resource limits set (soft = hard) before any untrusted code runs: address space
  (``memory_mb``), CPU seconds, size of files written, no core dumps;
- a Python audit hook (``sys.addaudithook``; it cannot be removed) that refuses sockets, new
  processes (fork, exec, spawn, subprocess, os.system), signals to other processes, ctypes,
  raising the limits (setrlimit, prlimit), and opening files for writing, removing, renaming
  or creating them outside the directory (the process keeps the caller's user: dropping to
  ``nobody`` would hide an interpreter installed under a private home such as /root);
- where the host allows it, a new network namespace (``unshare --net``, with a user
  namespace when not root), so there is no network even for native code;
  ``network_namespace()`` says whether it is in use;
- a wall-clock timeout: the whole process group is killed (SIGKILL) when it runs past it.
This is a guard against mistakes and runaway programs, not a security boundary for hostile
code (CPython's own escape hatches remain); run it on machines you can afford to lose.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs first in the child: limits, audit hook, then the program (argv[1]).
_BOOT = r"""
import os, resource, sys
mem, cpu, fsize = (int(a) for a in sys.argv[2:5])
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
path = sys.argv[1]
with open(path) as f:
    source = f.read()
home = os.path.realpath(os.getcwd()) + os.sep
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty",
           "os.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "resource.setrlimit",
           "resource.prlimit", "pty.")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def outside(p):
    return isinstance(p, (str, bytes, os.PathLike)) and not os.path.realpath(os.fsdecode(p)).startswith(home)
def guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and outside(args[0]):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & WRITE_FLAGS:
            raise PermissionError("sandbox: writing outside the sandbox directory is not allowed")
    if event in ("os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate", "os.chmod", "os.chown",
                 "os.link", "os.symlink", "os.mkdir", "shutil.rmtree", "shutil.move") and outside(args[0]):
        raise PermissionError("sandbox: " + event + " outside the sandbox directory is not allowed")
sys.addaudithook(guard)
del guard
sys.argv = [path]
exec(compile(source, path, "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock; the process group is killed after it
    memory_mb: int = 1024  # address space of the interpreter and the program together
    file_mb: int = 16  # largest file the program may write


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (non-zero exit, e.g. an AssertionError), "timeout"
    returncode: int | None  # None: killed on timeout
    output: str  # the last 4,000 characters of stdout and stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as a Python program in the sandbox and report how it ended."""
    if limits.timeout_s <= 0 or limits.memory_mb <= 0 or limits.file_mb <= 0:
        raise ValueError(f"sandbox limits must be positive, got {limits}")
    directory = tempfile.mkdtemp(prefix="sdsat-sandbox-")
    try:
        program = Path(directory) / "program.py"
        program.write_text(source)
        cpu_s = int(limits.timeout_s) + 1
        command = network_namespace() + [
            sys.executable, "-I", "-B", "-c", _BOOT, str(program),
            str(limits.memory_mb << 20), str(cpu_s), str(limits.file_mb << 20),
        ]
        env = {"HOME": directory, "TMPDIR": directory, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            command, cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            return SandboxResult("timeout", None, _tail(out))
        return SandboxResult("passed" if proc.returncode == 0 else "failed", proc.returncode, _tail(out))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(out: bytes) -> str:
    return out.decode("utf-8", "replace")[-4000:]


@functools.lru_cache(maxsize=1)
def network_namespace() -> list[str]:
    """The command prefix that gives the program a network namespace of its own, or [] where
    the host does not allow one (then the audit hook alone keeps the network out)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    prefix = [unshare, "--net"] + ([] if os.getuid() == 0 else ["--map-current-user"])
    try:
        ok = subprocess.run(prefix + [sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []
