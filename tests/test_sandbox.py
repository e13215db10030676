"""The code sandbox of `eval --code-pass-at-k`, probed the way a hostile sample would try to get out.

Each probe exits with "contained: ..." on stderr when its escape failed (the Outcome's detail), and checks the
host side where it can (files not written, listeners not reached, processes not left behind). Where this machine
cannot build the sandbox, the probes are skipped with the reason and the refusal path is tested instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jaxlora.eval import sandbox
from jaxlora.eval.sandbox import SandboxUnavailable, run_program


def bwrap_runs_here() -> bool:
    """Whether this machine can run bwrap at all (namespaces allowed), whatever our own command line says."""
    bwrap = sandbox.bwrap_binary()
    if bwrap is None:
        return False
    try:
        probe = subprocess.run([bwrap, "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


# Skipped only where bwrap cannot run at all: where it can, a sandbox that fails to build fails these tests.
needs_sandbox = pytest.mark.skipif(
    not bwrap_runs_here(), reason=f"bwrap cannot run on this machine: {sandbox.unavailable_reason()}"
)


def contained(source: str, timeout: float = 10.0) -> sandbox.Outcome:
    outcome = run_program(source, timeout=timeout)
    assert outcome.status == "failed" and outcome.detail.startswith("contained"), outcome
    return outcome


def attempt(imports: str, statement: str) -> str:
    """A program that tries `statement` and exits with "contained: <the error>" when it fails."""
    return f"{imports}, sys\ntry:\n    {statement}\nexcept OSError as e:\n    sys.exit(f'contained: {{e}}')\n"


def processes_with(marker: str) -> list[int]:
    """Pids on this machine whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry))
            except OSError:
                pass
    return found


@needs_sandbox
def test_files_outside_the_work_folder_are_neither_readable_nor_writable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's data")
    contained(
        f"import sys\ntry:\n    open({str(secret)!r}).read()\nexcept OSError as e:\n    sys.exit(f'contained: {{e}}')\n"
    )
    for target in (tmp_path / "marker", Path.cwd() / f"marker-{uuid.uuid4().hex}"):
        contained(
            f"import sys\ntry:\n    open({str(target)!r}, 'w').write('x')\nexcept OSError as e:\n"
            "    sys.exit(f'contained: {e}')\n"
        )
        assert not target.exists()
    # /etc/passwd and the user's home are not there; only the system and Python's own install are.
    contained("import os, sys\nif not os.path.exists('/etc/passwd'): sys.exit('contained: no /etc/passwd')\n")
    home = Path.home()
    python_dir = Path(sys.base_prefix).relative_to(home).parts[0] if home in Path(sys.base_prefix).parents else None
    private = sorted({p.name for p in home.iterdir()} - {python_dir})
    shown = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "proc", "dev", "tmp", Path(sys.base_prefix).parts[1]}
    hidden = sorted({p.name for p in Path("/").iterdir()} - shown)
    assert hidden  # the host's /etc at least
    contained(
        f"import os, sys\nseen = set(os.listdir('/'))\n"
        f"sys.exit(f'contained: / shows {{sorted(seen)}}') if not seen & set({hidden!r}) else None\n"
    )
    contained(
        f"import os, sys\nseen = set(os.listdir({str(home)!r})) if os.path.isdir({str(home)!r}) else set()\n"
        f"sys.exit(f'contained: home shows {{sorted(seen)}}') if not seen & set({private!r}) else None\n"
    )
    # Python's install is read-only.
    contained(
        f"import sys\ntry:\n    open({sys.base_prefix!r} + '/lib/escaped', 'w')\nexcept OSError as e:\n"
        "    sys.exit(f'contained: {e}')\n"
    )


@needs_sandbox
def test_the_work_folder_is_private_and_size_limited():
    name = f"jaxlora-probe-{uuid.uuid4().hex}"
    # 45 MB into the temp folder lands in the sample's own tmpfs, never in the host's.
    outcome = run_program(
        f"import tempfile, os\nopen(os.path.join(tempfile.gettempdir(), {name!r}), 'wb').write(b'x' * (45 << 20))\n"
    )
    assert outcome.passed, outcome
    assert not (Path("/tmp") / name).exists()
    contained(
        "import sys\ntry:\n    open('big', 'wb').write(b'x' * (200 << 20))\nexcept OSError as e:\n"
        "    sys.exit(f'contained: {e}')\n"
    )


@needs_sandbox
def test_no_network_tcp_udp_or_unix_socket(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for connect in (
            f"socket.create_connection(('127.0.0.1', {port}), timeout=2)",
            f"s = _socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', {port}))",
        ):
            contained(attempt("import socket, _socket", connect))
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()
    path = str(tmp_path / "host.sock")
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(path)
        unix.listen()
        contained(
            f"import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({path!r})\n"
            "except OSError as e:\n    sys.exit(f'contained: {e}')\n"
        )
        unix.settimeout(0.5)
        with pytest.raises(TimeoutError):
            unix.accept()
    # Only a loopback of its own: no interface reaches anything.
    contained(
        "import socket, sys\nnames = [n for _, n in socket.if_nameindex()]\n"
        "sys.exit(f'contained: interfaces {names}') if names == ['lo'] else None\n"
    )


@needs_sandbox
def test_our_process_is_invisible_and_unkillable():
    contained(
        f"import os, sys\nif not os.path.exists('/proc/{os.getpid()}/cmdline') or "
        f"{os.getpid()} in (1, 2):\n    sys.exit(f'contained: {{len(os.listdir(\"/proc\"))}} entries in /proc')\n"
    )
    # Killing its parent hits the sandbox's own init (pid 1 of its namespace), which ignores it.
    outcome = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n")
    assert outcome.status in ("passed", "failed")
    assert os.getppid() != 1  # and we are still here to say so


@needs_sandbox
def test_nothing_survives_the_sample():
    marker = f"jaxlora-daemon-probe-{uuid.uuid4().hex}"
    daemon = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        f"alive = any({marker!r} in open(f'/proc/{{p}}/cmdline').read() for p in os.listdir('/proc') if p.isdigit())\n"
        "sys.exit('contained: the daemon started and will die with the sample' if alive else 'daemon never started')\n"
    )
    contained(daemon)
    time.sleep(0.3)
    assert processes_with(marker) == []
    # The same at a timeout: the whole namespace goes.
    hung = daemon.replace("time.sleep(0.5)\n", "time.sleep(0.5)\nwhile True: pass\n")
    assert run_program(hung, timeout=2).status == "timeout"
    time.sleep(0.3)
    assert processes_with(marker) == []


@needs_sandbox
def test_process_count_is_limited():
    contained(
        "import os, sys, time\nchildren = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        children += 1\nexcept OSError as e:\n"
        "    sys.exit(f'contained: {children} children, then {e}')\n"
    )


@needs_sandbox
def test_memory_is_limited_for_all_of_a_samples_processes():
    if "for all of a sample's processes" not in sandbox.describe():
        pytest.skip(f"memory is limited per process only here: {sandbox.describe()}")
    # Three children of 600 MiB each: each is under the limit alone, together they are not.
    outcome = run_program(
        "import os, sys, time\npids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
        "        block = b'x' * (600 << 20)\n        time.sleep(3)\n        os._exit(0)\n    pids.append(pid)\n"
        "statuses = [os.waitpid(p, 0)[1] for p in pids]\n"
        "sys.exit(f'contained: child statuses {statuses}') if any(statuses) else None\n",
        timeout=20,
    )
    assert outcome.status == "failed", outcome
    assert outcome.detail.startswith(("contained", "killed at the memory limit")), outcome
    alone = run_program("import time\nblock = b'x' * (600 << 20)\n", timeout=20)
    assert alone.passed, alone


def test_without_a_sandbox_generated_code_is_refused_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv(sandbox.SANDBOX_PATH_ENV, str(tmp_path / "no-bwrap-here"))
    sandbox.unavailable_reason.cache_clear()
    sandbox.describe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            run_program("pass\n")
        marker = tmp_path / "ran"
        outcome = run_program(f"open({str(marker)!r}, 'w').write('x')\n", unsafe=True)
        assert outcome.passed and marker.exists()  # unisolated, as asked
        assert sandbox.describe().startswith("no sandbox")
    finally:
        sandbox.unavailable_reason.cache_clear()
        sandbox.describe.cache_clear()


def test_eval_refuses_code_without_a_sandbox_in_one_line(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"task_id": "t/0", "prompt": "def f():\\n", "test": "", "entry_point": "f"}\n')
    env = {**os.environ, sandbox.SANDBOX_PATH_ENV: str(tmp_path / "no-bwrap-here")}
    done = subprocess.run(
        [sys.executable, "-m", "jaxlora", "eval", str(tmp_path / "model"), "--code-pass-at-k", str(problems)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--unsafe-no-sandbox" in errors[0] and "bubblewrap" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
