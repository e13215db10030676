"""Run the `jaxlora` command in a child process forked from a server that has already imported the heavy libraries.

A fresh interpreter spends about 2 s importing JAX and orbax (4 s more when a command reaches transformers and
torch) before the command does anything; the bad-input corpus runs over a hundred commands. Here a
multiprocessing fork server imports those libraries once (imports only: no JAX backend, no thread pools), and each
command runs in a process forked from it: its own process, working folder, environment, address-space limit,
exit status, stdout and stderr, exactly as `python -m jaxlora ...` would give them.
"""

from __future__ import annotations

import multiprocessing
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when JAX is imported, below in the server

PRELOAD = ["forked_cli", "jax", "flax.linen", "optax", "orbax.checkpoint", "torch", "transformers", "jaxlora.cli"]


def _child(
    args: list[str], cwd: str, env: dict[str, str], out_path: str, err_path: str, code_path: str, memory_limit: int
) -> None:
    import resource
    import runpy
    import sys
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    sys.argv = ["jaxlora", *args]
    code = 0
    try:
        runpy.run_module("jaxlora", run_name="__main__", alter_sys=True)
    except SystemExit as stop:  # what the interpreter does with it at exit
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: the interpreter prints the traceback and exits 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(code_path, "w") as status:  # the exit status, also where the fork server fails to relay it
        status.write(str(code))
    os._exit(code)


_context = None


def context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def run(args: list[str], cwd, env: dict[str, str], logs, memory_limit: int, timeout: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `jaxlora ARGS` run in `cwd` with exactly the environment `env`; its output
    goes through files named by `logs` (a path prefix outside cwd)."""
    out_path, err_path, code_path = f"{logs}.stdout", f"{logs}.stderr", f"{logs}.code"
    if os.path.exists(code_path):
        os.remove(code_path)
    child = context().Process(target=_child, args=(args, str(cwd), env, out_path, err_path, code_path, memory_limit))
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise TimeoutError(f"jaxlora {' '.join(args)} ran past {timeout} s")
    # multiprocessing reports 255 when the fork server's status pipe closes before it relays the child's status
    # (seen once in a CI run, after the child had finished): the child's own record is the truth then.
    exit_code = child.exitcode
    if exit_code == 255 and os.path.exists(code_path):
        with open(code_path) as status:
            exit_code = int(status.read())
    with open(out_path) as out, open(err_path) as err:
        return exit_code, out.read(), err.read()
