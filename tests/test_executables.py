"""The store of whole executables (`jaxlora.executables`): what it keys on, what it refuses, what it reads back.

A new `stored_jit` of the same function stands for a new process: it has nothing in memory and must find the
program in the store. The model-level check (a second process generates the same tokens without tracing, lowering
or compiling anything) is in tests/test_generate.py.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import executables
from jaxlora.executables import stored_jit


@pytest.fixture
def store(tmp_path):
    executables.use(tmp_path / "store")
    yield tmp_path / "store"
    executables.use(None)


def scaled(x, state, factor, *, shift):
    return {"out": x * factor + state[0] + shift}, state[1] - 1


def new_process_function(**options):
    """`scaled` as a freshly imported stored function: nothing compiled in memory."""
    return stored_jit(scaled, static_argnums=(2,), static_argnames=("shift",), **options)


def inputs(shape=(3,), dtype=jnp.float32):
    return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape), (jnp.ones(shape, dtype), jnp.int32(5))


class NeverLowered:
    """In place of the jitted function: any use means the call traced, lowered or compiled."""

    def __getattr__(self, name):
        raise AssertionError(f"the stored program was not used: jit's {name} was")

    def __call__(self, *args, **kwargs):
        raise AssertionError("the stored program was not used: jit was called")


def same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def stored_files(store) -> list[str]:
    return sorted(p.name for p in store.glob("*.bin")) if store.exists() else []


def test_a_new_process_runs_the_stored_program_without_tracing_or_lowering_it(store):
    x, state = inputs()
    expected = jax.jit(scaled, static_argnums=(2,), static_argnames=("shift",))(x, state, 2.0, shift=1)
    same(new_process_function()(x, state, 2.0, shift=1), expected)
    assert len(stored_files(store)) == 1 and not list(store.glob("*.partial"))
    later = new_process_function()
    later.jitted = NeverLowered()
    same(later(x, state, 2.0, shift=1), expected)
    same(later(x, state, 2.0, shift=1), expected)  # from memory now


def test_reading_a_stored_program_marks_it_used_for_the_caches_pruning(store):
    import os
    import time

    x, state = inputs()
    new_process_function()(x, state, 2.0, shift=1)
    (path,) = store.glob("*.bin")
    month_ago = time.time() - 30 * 86400
    os.utime(path, (month_ago, month_ago))
    later = new_process_function()
    later.jitted = NeverLowered()
    later(x, state, 2.0, shift=1)
    assert path.stat().st_mtime > time.time() - 600
    assert executables.own_files(store) == ([path], [])


def test_each_input_signature_and_static_value_has_its_own_program(store):
    function = new_process_function()
    calls = [
        (inputs(), 2.0, 1),
        (inputs((2, 3)), 2.0, 1),  # shape
        (inputs(dtype=jnp.bfloat16), 2.0, 1),  # dtype
        (inputs(), 3.0, 1),  # a static argument by position
        (inputs(), 2.0, 2),  # a static argument by name
    ]
    for (x, state), factor, shift in calls:
        expected = jax.jit(scaled, static_argnums=(2,), static_argnames=("shift",))(x, state, factor, shift=shift)
        same(function(x, state, factor, shift=shift), expected)
    assert len(stored_files(store)) == len(calls)
    x, state = inputs()
    function(x + 1, state, 2.0, shift=1)  # new values, same signature
    new_process_function()(x, state, 2.0, shift=1)
    assert len(stored_files(store)) == len(calls)


def test_a_weak_typed_input_is_not_its_strong_typed_twin(store):
    function = stored_jit(lambda x, y: x + y)
    strong = function(jnp.ones(2, jnp.bfloat16), jnp.asarray(2.0, jnp.float32))
    weak = function(jnp.ones(2, jnp.bfloat16), jnp.asarray(2.0))  # a weak float32 keeps bfloat16
    assert (strong.dtype, weak.dtype) == (jnp.float32, jnp.bfloat16)
    assert len(stored_files(store)) == 2


def test_donated_inputs_stay_donated_from_the_store(store):
    def bump(buffer, step):
        return buffer + step

    for _ in range(2):  # compiled, then read back by a "new process"
        function = stored_jit(bump, donate_argnums=(0,))
        buffer = jnp.zeros((4, 4))
        out = function(buffer, jnp.float32(1))
        assert buffer.is_deleted()
        np.testing.assert_array_equal(np.asarray(out), np.ones((4, 4)))
    assert len(stored_files(store)) == 1
    (name,) = stored_files(store)
    assert name.startswith("test_donated_inputs_stay_donated_from_the_store._locals_.bump-")  # a plain file name


def test_calls_without_a_stable_key_are_plain_jit_calls(store):
    x, state = inputs()
    function = new_process_function()
    expected = function(x, state, 2.0, shift=1)
    assert len(stored_files(store)) == 1
    inside = jax.jit(lambda x, state: function(x, state, 2.0, shift=1))(x, state)  # tracers: a caller's own jit
    same(inside, expected)

    class Marker:  # repr names an address: no stable key across processes
        def __radd__(self, other):
            return other + 1

    same(function(x, state, 2.0, shift=Marker()), expected)
    same(function(x, (jnp.ones(3), 5), 2.0, shift=1), expected)  # a Python scalar input
    same(function(np.asarray(x), state, 2.0, shift=1), expected)  # a host array
    assert len(stored_files(store)) == 1
    executables.use(None)
    same(new_process_function()(x, state, 2.0, shift=1), expected)


def test_a_program_from_another_environment_is_never_read(store, monkeypatch):
    """jaxlora's source, the library versions, the backend and the CPU's instruction sets are in the key."""
    x, state = inputs()
    new_process_function()(x, state, 2.0, shift=1)
    (original,) = stored_files(store)
    monkeypatch.setattr(executables, "_environment", lambda: ("another jaxlora source", "another CPU"))
    later = new_process_function()
    same(
        later(x, state, 2.0, shift=1),
        jax.jit(scaled, static_argnums=2, static_argnames="shift")(x, state, 2.0, shift=1),
    )
    assert len(stored_files(store)) == 2 and original in stored_files(store)


def test_the_environment_names_the_source_libraries_and_cpu():
    environment = executables._environment()
    assert jax.__version__ in environment and jax.devices()[0].client.platform in environment
    assert executables._cpu_features() in environment
    assert len(environment[0]) == 64  # the source's sha256


class MakesAFolder:
    """A pickle that would run code when loaded (`os.mkdir` of a marker folder)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.path),)


@pytest.mark.parametrize("kind", ["garbage", "code in the trees", "code in the executable"])
def test_an_unreadable_or_foreign_entry_is_compiled_again_and_never_runs_code(store, tmp_path, kind):
    x, state = inputs()
    expected = new_process_function()(x, state, 2.0, shift=1)
    (name,) = stored_files(store)
    marker = tmp_path / "marker"
    foreign = {
        "garbage": b"not a stored executable",
        "code in the trees": pickle.dumps({"executable": b"", "in_tree": MakesAFolder(marker), "out_tree": None}),
        "code in the executable": pickle.dumps(
            {"executable": pickle.dumps(MakesAFolder(marker)), "in_tree": None, "out_tree": None}
        ),
    }[kind]
    (store / name).write_bytes(foreign)
    with pytest.warns(UserWarning, match="stored executable is unreadable"):
        same(new_process_function()(x, state, 2.0, shift=1), expected)
    assert not marker.exists()
    later = new_process_function()  # the entry was written again, whole
    later.jitted = NeverLowered()
    same(later(x, state, 2.0, shift=1), expected)
