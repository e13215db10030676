"""Run untrusted generated code in a child process: a fresh temp working folder, a wall-clock limit, memory and
CPU limits, no network (a new network namespace where the OS allows one; sockets refused in any case), and
nothing inherited but a minimal environment. Never in the calling process."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_LIMIT = 2 << 30  # bytes of address space

# Prepended to every program: even without a network namespace, no socket can be opened.
_PRELUDE = """\
import socket as _socket
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in the jaxlora sandbox")
_socket.socket = _NoSocket
del _socket, _NoSocket
"""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str  # the last line of stderr for a failure


@functools.cache
def _isolation_prefix() -> tuple[str, ...]:
    """`unshare -rn` (an empty network namespace, as an unprivileged user) if it works here, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


def _limits(timeout: float):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    return apply


def run_program(source: str, timeout: float = 5.0) -> Outcome:
    """Run `source` with `python -I` in a temp folder; passed = exit status 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="jaxlora-sandbox-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w") as f:
            f.write(_PRELUDE + source)
        command = [*_isolation_prefix(), sys.executable, "-I", path]
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "PYTHONHASHSEED": "0"}
        child = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so a timeout kills whatever it spawned too
            preexec_fn=_limits(timeout),
        )
        try:
            _, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Outcome(False, "timeout", f"no result within {timeout:g}s")
    if child.returncode == 0:
        return Outcome(True, "passed", "")
    lines = stderr.strip().splitlines()
    return Outcome(False, "failed", lines[-1] if lines else f"exit status {child.returncode}")
