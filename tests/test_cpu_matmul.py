"""The CPU decode kernel (`jaxlora.cpu_matmul`): its products, the tiled copy decode loops read (and later
prefills of the same params), and generation with it equal to generation without it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora import cpu_matmul
from jaxlora.model import decode_params, get_path, linear_kernels, prefill_params

generate_module = importlib.import_module("jaxlora.generate")  # the package's `generate` is the function


def test_the_kernel_builds_and_registers_here():
    # The machines this suite runs on have a C++ compiler: a fallback to XLA's dot must not pass for the kernel.
    assert cpu_matmul._registered()
    assert list(cpu_matmul.kernels_folder().glob("tiled_matmul-*.so"))


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("n", [32, 97, 160])
def test_tiles_hold_the_kernel_and_zeros_past_its_columns(lead, n):
    kernel = jax.random.normal(jax.random.key(0), (*lead, 37, n))
    tiled = cpu_matmul.tile(kernel)
    count = -(-n // 32)
    assert tiled["tiles"].shape == (*lead, count, 37, 32)
    np.testing.assert_array_equal(cpu_matmul.untile(tiled, n), kernel)
    padded = cpu_matmul.untile(tiled, count * 32)
    np.testing.assert_array_equal(padded[..., n:], 0)
    # tile t, row k, column c is kernel[k, 32 t + c]
    last = count - 1
    np.testing.assert_array_equal(tiled["tiles"][..., last, 5, 0], kernel[..., 5, 32 * last])


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40, 64, 250, 257])
@pytest.mark.parametrize(("k", "n"), [(37, 97), (576, 192), (128, 1024), (1, 32)])
def test_products_equal_float64_within_float32_rounding(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    kernel = rng.standard_normal((k, n)).astype(np.float32)
    exact = x.astype(np.float64) @ kernel.astype(np.float64)
    got = np.asarray(jax.jit(cpu_matmul.matmul, static_argnums=2)(x, cpu_matmul.tile(kernel), n))
    assert got.shape == (rows, n) and got.dtype == np.float32
    # float32 sums of k products: error within a few ulps of the sum of magnitudes
    bound = 4 * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(kernel)) * np.sqrt(k)
    assert (np.abs(got - exact) <= bound + 1e-30).all()


def test_products_under_a_callers_vmap_equal_each_call_alone():
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((3, 5, 64)).astype(np.float32)
    kernels = rng.standard_normal((3, 64, 70)).astype(np.float32)
    tiled = cpu_matmul.tile(kernels[0])
    over_x = jax.vmap(lambda x: cpu_matmul.matmul(x, tiled, 70))(xs)
    over_both = jax.vmap(lambda x, k: cpu_matmul.matmul(x, cpu_matmul.tile(k), 70))(xs, kernels)
    for i in range(3):
        np.testing.assert_allclose(over_x[i], xs[i] @ kernels[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(over_both[i], xs[i] @ kernels[i], rtol=1e-5, atol=1e-5)


def test_leading_axes_and_a_program_of_concurrent_products():
    # Independent products in one program may run at once on XLA's pool: each call still finishes (a call whose
    # helpers cannot start does every part itself) and gives its own product.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 64)).astype(np.float32)
    kernels = [rng.standard_normal((64, 96 + 32 * i)).astype(np.float32) for i in range(6)]

    @jax.jit
    def products(x, tiled):
        return [cpu_matmul.matmul(x, t, 96 + 32 * i) for i, t in enumerate(tiled)]

    got = products(x, [cpu_matmul.tile(k) for k in kernels])
    for kernel, out in zip(kernels, got, strict=True):
        assert out.shape == (4, 1, kernel.shape[1])
        np.testing.assert_allclose(out, x @ kernel, rtol=1e-5, atol=1e-5)


def _kernel_paths(tree, config) -> list:
    return [path for path in linear_kernels(config) if cpu_matmul.is_tiled(get_path(tree, (*path, "kernel")))]


def test_decode_params_tile_each_linear_and_a_tied_head_once_per_tree(tiny):
    model = jaxlora.load(tiny("llama-tied-mha").jax_dir)
    params, config = model.params, model.config
    assert config.tie_word_embeddings
    loop = decode_params(params, config, 8)
    assert _kernel_paths(loop, config) == list(linear_kernels(config))
    head = loop[cpu_matmul.HEAD_TILES]
    np.testing.assert_array_equal(cpu_matmul.untile(head, config.vocab_size), params["embed"]["embedding"].T)
    assert loop["embed"]["embedding"] is params["embed"]["embedding"]  # the rest shared, not copied
    assert not cpu_matmul.is_tiled(params["layers_0"]["attn"]["q_proj"]["kernel"])  # the caller's tree unchanged
    assert decode_params(params, config, 1) is loop  # made once per tree
    other = jax.tree.map(lambda a: a + 0, params)
    assert decode_params(other, config, 8) is not loop
    # where the kernel does not serve: many rows, switched off, already tiled
    assert decode_params(params, config, cpu_matmul.MAX_ROWS + 1) is params
    assert decode_params(loop, config, 8) is loop
    traced = []  # inside a caller's jit: the params are tracers, never tiled
    jax.jit(lambda p: traced.append(decode_params(p, config, 8) is p) or 0)(params)
    assert traced == [True]


def test_decode_params_leave_quantized_and_half_precision_weights_alone(tiny):
    half = jaxlora.load(tiny("llama-gqa").jax_dir, dtype="bfloat16")
    loop = decode_params(half.params, half.config, 8)
    assert loop is half.params
    quantized = jaxlora.load(tiny("llama-gqa").jax_dir, quantize="int8")
    loop = decode_params(quantized.params, quantized.config, 8)
    assert not _kernel_paths(loop, quantized.config)


def _generated(model, ids, **options):
    out = jaxlora.generate(model.params, model.config, ids, max_new_tokens=12, return_logprobs=True, **options)
    return np.asarray(out.tokens), np.asarray(out.raw_logprobs)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-mha", "gpt2", "mixtral"])
def test_generation_with_the_kernel_equals_generation_without(tiny, name, monkeypatch):
    model = jaxlora.load(tiny(name).jax_dir)
    ids = np.random.default_rng(0).integers(1, model.config.vocab_size, (3, 7))
    assert decode_params(model.params, model.config, 3) is not model.params  # the kernel serves this model
    with_kernel = _generated(model, ids)
    monkeypatch.setenv(cpu_matmul.SWITCH, "off")
    assert decode_params(model.params, model.config, 3) is model.params
    without = _generated(model, ids)
    np.testing.assert_array_equal(with_kernel[0], without[0])
    np.testing.assert_allclose(with_kernel[1], without[1], atol=1e-5)


def test_a_prefill_reads_the_tiled_copy_only_once_a_decode_loop_made_it(tiny, monkeypatch):
    model = jaxlora.load(tiny("llama-tied-mha").jax_dir)
    params, config = model.params, model.config
    fresh = jax.tree.map(lambda a: a + 0, params)
    assert prefill_params(fresh, config, 16) is fresh  # nothing is tiled for a prefill's sake
    loop = decode_params(params, config, 2)
    assert prefill_params(params, config, 16) is loop
    assert prefill_params(params, config, cpu_matmul.max_rows()) is loop
    assert prefill_params(params, config, cpu_matmul.max_rows() + 1) is params  # past the kernel's rows
    assert prefill_params(fresh, config, 16) is fresh  # another tree's copy is not this one's
    monkeypatch.setenv(cpu_matmul.SWITCH, "off")
    assert prefill_params(params, config, 16) is params


def test_the_copy_held_is_only_ever_the_one_made_for_the_tree_asked_about():
    copies = cpu_matmul._Copies()
    first = {"w": jax.numpy.ones(3)}
    second = {"w": jax.numpy.zeros(3)}
    assert copies.held(first) is None
    assert copies.get(first, lambda: "copy of first") == "copy of first"
    assert copies.get(first, lambda: pytest.fail("made twice")) == "copy of first"

    def make_second():
        assert copies.held(first) is None  # the old copy is let go before the new one is made
        assert copies.held(second) is None
        return "copy of second"

    assert copies.get(second, make_second) == "copy of second"
    assert copies.held(first) is None and copies.held(second) == "copy of second"
    assert copies.held({"w": jax.numpy.zeros(3)}) is None  # equal values, other arrays


def test_the_kernel_takes_a_prefills_rows_on_avx512_only():
    with open("/proc/cpuinfo") as info:
        avx512 = any(line.startswith("flags") and " avx512f" in line for line in info)
    assert cpu_matmul.max_rows() == (cpu_matmul.MAX_ROWS_AVX512 if avx512 else cpu_matmul.MAX_ROWS)


def _spy(monkeypatch, module, name: str, note) -> list:
    """Wrap module.name so that each call first appends note(*args) to the returned list."""
    notes, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        notes.append(note(*args))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return notes


@pytest.mark.parametrize("name", ["llama-tied-mha", "gpt2", "mixtral"])
def test_a_prompt_prefilled_on_the_tiled_copy_generates_what_xla_does(tiny, name, monkeypatch):
    model = jaxlora.load(tiny(name).jax_dir)
    ids = np.random.default_rng(1).integers(1, model.config.vocab_size, (2, 20))  # a 32-token bucket: 64 rows
    plain_params = _spy(monkeypatch, generate_module, "prefill_by_layer", lambda params, *_: params is model.params)
    first = _generated(model, ids)  # prefill on the params as they are; the decode loop tiles them
    second = _generated(model, ids)  # prefill on the decode loop's tiled copy
    monkeypatch.setenv(cpu_matmul.SWITCH, "off")
    without = _generated(model, ids)
    expected = [True, cpu_matmul.max_rows() < 64, True]
    assert plain_params == expected
    for got in (first, second):
        np.testing.assert_array_equal(got[0], without[0])
        np.testing.assert_allclose(got[1], without[1], atol=1e-5)


def test_a_chats_later_turn_runs_on_the_tiled_copy_and_answers_as_xla_does(tiny_with_tokenizer, monkeypatch):
    from jaxlora import chat
    from jaxlora.chat import ChatSession

    model = jaxlora.load(tiny_with_tokenizer / "jax")
    plain_params = _spy(
        monkeypatch,
        chat,
        "extend",
        lambda params, state, padded, *_: (params is model.params, padded.shape[1] > cpu_matmul.max_rows()),
    )

    def conversation():
        session = ChatSession(model, max_new_tokens=10)
        turns = [sum((chunk.row(0) for chunk in session.send(text)), []) for text in ("Hello there.", "And again?")]
        assert session.reused_turns == 1
        return turns

    with_kernel = conversation()
    ((plain, too_many_rows),) = plain_params  # the second turn's tokens, on the copy where the kernel takes them
    assert plain == too_many_rows
    monkeypatch.setenv(cpu_matmul.SWITCH, "off")
    assert conversation() == with_kernel
    assert plain_params[-1][0] is True


def test_beam_search_steps_over_the_tiled_copy_and_finds_what_xla_does(tiny, monkeypatch):
    beam = importlib.import_module("jaxlora.beam")
    model = jaxlora.load(tiny("llama-tied-mha").jax_dir)
    ids = np.random.default_rng(2).integers(1, model.config.vocab_size, (2, 9))
    tiled_params = _spy(
        monkeypatch,
        beam,
        "_beam_search",
        lambda params, tiled, *_: tiled is not None and cpu_matmul.HEAD_TILES in tiled,
    )

    def searched():
        out = jaxlora.beam_search(model.params, model.config, ids, num_beams=3, max_new_tokens=8)
        return np.asarray(out.tokens), np.asarray(out.scores)

    with_kernel = searched()
    # inside a caller's jit the params are tracers: no tiled copy, the same search
    inside = jax.jit(lambda p: jaxlora.beam_search(p, model.config, ids, num_beams=3, max_new_tokens=8).tokens)
    inside_tokens = np.asarray(inside(model.params))
    monkeypatch.setenv(cpu_matmul.SWITCH, "off")
    without = searched()
    assert tiled_params == [True, False, False]
    np.testing.assert_array_equal(with_kernel[0], without[0])
    np.testing.assert_allclose(with_kernel[1], without[1], atol=1e-5)
    np.testing.assert_array_equal(inside_tokens, without[0])


def test_sample_decodes_over_the_tiled_copy_and_samples_what_xla_does(tiny, monkeypatch):
    decoding = importlib.import_module("jaxlora.decoding")
    model = jaxlora.load(tiny("gpt2").jax_dir)
    ids = np.random.default_rng(4).integers(1, model.config.vocab_size, (2, 9))
    tiled_params = _spy(monkeypatch, decoding, "_sample", lambda params, tiled, *_: tiled is not None)
    sampling = jaxlora.Sampling(temperature=0.8, top_k=20)

    def sampled(key):
        return jaxlora.sample(model.params, model.config, ids, key=key, max_new_tokens=10, sampling=sampling).tokens

    with_kernel = np.asarray(sampled(jax.random.key(5)))
    # under a caller's vmap over keys (and inside a jit) the inputs are traced: no tiled copy, the same tokens
    keys = jax.random.split(jax.random.key(6), 2)
    mapped = np.asarray(jax.jit(jax.vmap(sampled))(keys))
    monkeypatch.setenv(cpu_matmul.SWITCH, "off")
    np.testing.assert_array_equal(with_kernel, sampled(jax.random.key(5)))
    for i in range(2):
        np.testing.assert_array_equal(mapped[i], sampled(keys[i]))
    assert tiled_params == [True, False, False, False, False]


@pytest.mark.parametrize("compiler", ["missing", "none on the path"])
def test_without_a_compiler_generation_falls_back_to_xla_with_a_warning(tiny, tmp_path, compiler):
    script = textwrap.dedent(
        """
        import sys, warnings
        import numpy as np
        import jaxlora
        from jaxlora.model import decode_params
        model = jaxlora.load(sys.argv[1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop = decode_params(model.params, model.config, 2)
        assert loop is model.params, "fell back"
        assert any("CPU decode kernel could not be built" in str(w.message) for w in caught), caught
        out = jaxlora.generate(model.params, model.config, np.array([[5, 6, 7]]), max_new_tokens=4)
        print(np.asarray(out.tokens).tolist())
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if compiler == "none on the path":
        env.pop("CXX")
        env["PATH"] = str(tmp_path)  # python runs by its full path
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny("llama-gqa").jax_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_threads_asking_at_once_build_and_register_it_once(tmp_path):
    script = textwrap.dedent(
        """
        from concurrent.futures import ThreadPoolExecutor
        from jaxlora import cpu_matmul, native
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: cpu_matmul._registered(), range(8)))
        assert answers == [True] * 8, answers
        assert native._build_and_register.cache_info().misses == 1
        """
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "jaxlora" / "kernels").glob("tiled_matmul-*.so"))) == 1
    assert not list((tmp_path / "jaxlora" / "kernels").glob(".build-*"))  # no staging left behind


def test_the_tiled_decode_loop_compiles_with_its_own_options(tiny):
    from jaxlora.decoding import decode, decode_for, tiled_decode

    model = jaxlora.load(tiny("llama-gqa").jax_dir)
    loop = decode_params(model.params, model.config, 2)
    assert decode_for(model.params, loop) is tiled_decode()
    assert decode_for(model.params, model.params) is decode
    assert tiled_decode()._compiler_options == tuple(sorted(cpu_matmul.LOOP_COMPILER_OPTIONS.items()))
    assert decode._compiler_options == ()
