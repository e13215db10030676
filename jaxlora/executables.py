"""Whole compiled programs on disk: a later process calls them without tracing or lowering anything.

JAX's persistent compile cache (`jaxlora.compile_cache`) spares a new process XLA's compile, but not the work
before it: each jitted function is still traced to a jaxpr and lowered to MLIR (the first lowering also starts
MLIR) before the cache is looked up. Measured on SmolLM2, batch 1, a 64-token prompt, a second process: of its
0.63 s to the first token, 0.11 s was tracing and 0.18 s lowering; its first decode chunk traced and lowered for
0.93 s more.

`stored_jit` is `jax.jit` for the functions of the generation path, with a store beside that cache: a call that
misses compiles as jit would, then writes the executable (`jax.experimental.serialize_executable`); a later process
with the same call reads it back in milliseconds. A program is stored under a key of everything it is built from:
the function, jaxlora's source (its kernels' too), whether its CPU kernels are switched off, the versions of jax
and jaxlib, the backend and the CPU's instruction sets, XLA's flags, JAX's tracing configuration, the input tree
with each array's shape, dtype, weak type and device, and the static arguments (only those whose repr is a value;
an object's address changes with the process). Anything else makes the call a plain `jax.jit` call: the store
off, an input that is not an array on one device (a tracer inside a caller's `jit`, a global array on a mesh, a
Python scalar), a write or read that fails. Only a program XLA
compiled in this process is stored: one JAX read from its own cache serializes incomplete, so after jaxlora's
source changes, a program whose HLO did not change stays with JAX's cache (traced and lowered as before).

The store is on exactly when jaxlora's compile cache is (`compile_cache.enable`: `jaxlora.load` by default), in
that folder's `executables/`. A stored program is machine code, as in JAX's own cache: the folder is trusted as
much as the user's own files. Its files are read by an unpickler that builds only JAX's, numpy's and jaxlora's
own types, never an arbitrary callable.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import pickle
import platform
import re
import tempfile
import warnings
from pathlib import Path

import jax
from jax._src import config as jax_config
from jax.experimental import serialize_executable

from jaxlora import native

FORMAT = 1
SUBFOLDER = "executables"
_folder: Path | None = None


def use(folder: str | os.PathLike | None) -> None:
    """Store executables in `folder` from now on (None: store nothing; calls are plain `jax.jit` calls)."""
    global _folder
    _folder = None if folder is None else Path(folder)


def folder_in_use() -> Path | None:
    return _folder


class StoredJit:
    """`jax.jit(fun, ...)` whose executables are kept in the store (see the module). Everything else about the
    jitted function (`lower`, `trace`, `_cache_size`, ...) is the plain jitted function's."""

    def __init__(self, fun, static_argnums=(), static_argnames=(), **jit_options):
        static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        # Only what is given: jit infers the positions of static names only when it is not handed argnums itself.
        statics = {"static_argnums": static_argnums} if static_argnums else {}
        statics |= {"static_argnames": static_argnames} if static_argnames else {}
        self.jitted = jax.jit(fun, **statics, **jit_options)
        self._compiler_options = tuple(sorted((jit_options.get("compiler_options") or {}).items()))
        functools.update_wrapper(self, fun)
        parameters = list(inspect.signature(fun).parameters.values())
        names = set(static_argnames) | {parameters[i].name for i in static_argnums}
        self._static_names = frozenset(names)
        self._static_positions = frozenset(
            i
            for i, p in enumerate(parameters)
            if p.name in names and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        self._in_memory: dict = {}

    def __getattr__(self, name):
        return getattr(self.jitted, name)

    def __call__(self, *args, **kwargs):
        if _folder is None:
            return self.jitted(*args, **kwargs)
        dynamic_args = tuple(a for i, a in enumerate(args) if i not in self._static_positions)
        dynamic_kwargs = {k: v for k, v in kwargs.items() if k not in self._static_names}
        leaves, tree = jax.tree.flatten((dynamic_args, dynamic_kwargs))
        signature = _leaf_signatures(leaves)
        if signature is None:
            return self.jitted(*args, **kwargs)
        statics = (
            tuple((i, a) for i, a in enumerate(args) if i in self._static_positions),
            tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static_names)),
        )
        key = (tree, signature, statics, jax_config.trace_context())  # the rest of jit's own cache key
        compiled = self._in_memory.get(key)
        if compiled is None:
            compiled = self._in_memory[key] = self._stored_or_compiled(key, args, kwargs)
        return compiled(*dynamic_args, **dynamic_kwargs)

    def _stored_or_compiled(self, key, args, kwargs):
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                native.register_declared()  # the program may call jaxlora's kernels: XLA must know them first
                compiled = _read(path)
                _mark_used(path)
                return compiled
            except Exception as e:  # noqa: BLE001 - an unreadable entry is compiled again and replaced
                warnings.warn(f"jaxlora: {self.__qualname__}'s stored executable is unreadable: {e}", stacklevel=3)
        hits_before = _jax_cache_hits
        compiled = self.jitted.lower(*args, **kwargs).compile()
        # An XLA:CPU executable JAX read from its own cache serializes without some of its functions (a process
        # loading one failed: "Function wrapped_broadcast not found"): only a program XLA compiled here is stored.
        if path is None or _jax_cache_hits != hits_before:
            return compiled
        try:
            _write(path, compiled)
        except Exception as e:  # noqa: BLE001 - e.g. an executable with constants JAX cannot serialize
            warnings.warn(f"jaxlora: {self.__qualname__}'s executable is not stored: {e}", stacklevel=3)
        return compiled

    def _path(self, key) -> Path | None:
        """The store's file for this call, or None when the call has no stable key."""
        tree, signature, statics, context = key
        if _ADDRESS.search(repr(statics)):
            return None
        described = repr(
            (FORMAT, self.__module__, self.__qualname__, _environment(), str(tree), signature, statics)
            + ((self._compiler_options,) if self._compiler_options else ())  # (the same key as before without)
            + (("kernels off",) if native.switched_off() else ())  # traced without jaxlora's CPU kernels
        )
        described += _ADDRESS.sub("", repr(context))  # JAX's configuration (its empty axis environment is an object)
        digest = hashlib.sha256(described.encode()).hexdigest()[:40]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.__qualname__).strip("_.")  # `<locals>`, `<lambda>`
        return _folder / f"{name}-{digest}.bin"


def _mark_used(path: Path) -> None:
    """A read entry's modification time is its last use, which the cache's pruning goes by (file systems mounted
    without access times never update those)."""
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only store is still read


# The store's own files: entries, and the staged copies a writer renames into them (`_write`).
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_.-]+-[0-9a-f]{40}\.bin")
_STAGED_NAME = re.compile(r"\.[A-Za-z0-9_.-]+-[0-9a-f]{40}\.bin\.[A-Za-z0-9_]+\.partial")


def own_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The store's entries and staged files in `folder` (nothing else there is the store's), each list sorted."""
    if not folder.is_dir():
        return [], []
    names = sorted(p for p in folder.iterdir() if p.is_file())
    return [p for p in names if _ENTRY_NAME.fullmatch(p.name)], [p for p in names if _STAGED_NAME.fullmatch(p.name)]


def stored_jit(fun=None, **jit_options):
    """`jax.jit` with the executable store; as a decorator: `@stored_jit(static_argnames=..., donate_argnames=...)`."""
    if fun is None:
        return lambda f: StoredJit(f, **jit_options)
    return StoredJit(fun, **jit_options)


def _leaf_signatures(leaves) -> tuple | None:
    """Each input array's (shape, dtype, weak type, device id); None when one is not an array on one device."""
    signature = []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer) or len(leaf.sharding.device_set) != 1:
            return None
        (device,) = leaf.sharding.device_set
        aval = jax.typeof(leaf)
        signature.append((aval.shape, str(aval.dtype), bool(aval.weak_type), device.id))
    return tuple(signature)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_jax_cache_hits = 0  # executables JAX read from its persistent cache in this process (another thread's count too)


def _count_jax_cache_hit(event: str, **_) -> None:
    global _jax_cache_hits
    if event == "/jax/compilation_cache/cache_hits":
        _jax_cache_hits += 1


jax.monitoring.register_event_listener(_count_jax_cache_hit)


@functools.cache
def _environment() -> tuple:
    """What a program depends on besides its call: jaxlora's source, the libraries, the backend and the CPU."""
    import jaxlib

    source = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.cc")]):  # the kernels' sources too
        source.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    device = jax.devices()[0]
    return (
        source.hexdigest(),
        jax.__version__,
        jaxlib.__version__,
        device.client.platform,
        device.client.platform_version,
        device.device_kind,
        len(jax.devices()),
        platform.machine(),
        _cpu_features(),
        os.environ.get("XLA_FLAGS", ""),
    )


def _cpu_features() -> str:
    """The CPU's instruction sets (an executable compiled for AVX-512 must not run on a CPU without it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return hashlib.sha256(" ".join(sorted(line.split(":", 1)[1].split())).encode()).hexdigest()
    except OSError:
        pass
    return platform.processor()


def _write(path: Path, compiled) -> None:
    """The executable with its input and output trees, written whole under `path` (staged, then renamed)."""
    executable, in_tree, out_tree = serialize_executable.serialize(compiled)
    payload = pickle.dumps({"executable": executable, "in_tree": in_tree, "out_tree": out_tree})
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


# What a stored file may name: anything of JAX's executables, shardings and avals, numpy's and ml_dtypes' dtypes
# and jaxlora's named tuples (None: the whole package), and a few plain containers.
_ALLOWED = {
    **dict.fromkeys(("jax", "jaxlib", "numpy", "ml_dtypes", "jaxlora")),
    "builtins": {"tuple", "list", "dict", "set", "frozenset", "int", "float", "bool", "str", "bytes", "slice"},
    "collections": {"OrderedDict", "defaultdict"},
}


class _AllowListed:
    """An unpickler's `find_class` that refuses every global outside `_ALLOWED`."""

    def find_class(self, module, name):
        root = module.split(".")[0]
        if root not in _ALLOWED or (_ALLOWED[root] is not None and name not in _ALLOWED[root]):
            raise pickle.UnpicklingError(f"a stored executable may not name {module}.{name}")
        return super().find_class(module, name)


class _TreesUnpickler(_AllowListed, pickle.Unpickler):
    pass


class _ExecutableUnpickler(_AllowListed, serialize_executable._JaxPjrtUnpickler):
    pass


def _read(path: Path):
    """The stored executable, loaded onto this process's devices, as a `jax.stages.Compiled`."""
    stored = _TreesUnpickler(io.BytesIO(path.read_bytes())).load()
    backend = jax.devices()[0].client
    unloaded, args_info_flat, no_kwargs = _ExecutableUnpickler(io.BytesIO(stored["executable"]), backend).load()
    args_info = stored["in_tree"].unflatten(args_info_flat)
    return jax.stages.Compiled(unloaded.load(), [], args_info, stored["out_tree"], no_kwargs=no_kwargs)
