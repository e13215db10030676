"""Fine-tuning: data formats and loss masks, the pure train step, the finetune run, SIGKILL + resume, PEFT CLI."""

import json
import logging
import shutil
import signal
import subprocess
import sys
from functools import partial

import jax
import numpy as np
import optax
import pytest
from conftest import hf_model, save_hf, xla_flags

import jaxlora
from jaxlora import lora
from jaxlora.checkpoint import load_adapters
from jaxlora.data import Batches, PreferencePairs, read_examples, read_pairs, tokenize
from jaxlora.errors import UsageError
from jaxlora.train import init_state, make_optimizer, make_train_step, token_loss

pytestmark = pytest.mark.real  # borrows the real SmolLM2 tokenizer

TINY = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def tiny_chat(smollm2_checkpoint, tmp_path_factory):
    """A tiny random llama that speaks SmolLM2's tokenizer (and chat template), converted, plus its torch twin."""
    dst = smollm2_checkpoint
    root = tmp_path_factory.mktemp("tiny-chat")
    torch_model = hf_model(TINY, seed=3)
    save_hf(torch_model, root / "hf")
    for file in (dst / "tokenizer").iterdir():
        shutil.copy(file, root / "hf" / file.name)
    jaxlora.convert(str(root / "hf"), root / "jax")
    lines = [json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."}) for i in range(24)]
    lines.append(
        json.dumps(
            {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]}
        )
    )
    lines.append(json.dumps({"text": "Plain text is learned everywhere."}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    pairs = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": f" It is {2 * i + 1}."}
        for i in range(10)
    ]
    pairs.append(
        {
            "prompt": [{"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "Hi there!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    )
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    return root, torch_model


def test_loss_masks_follow_the_format(tiny_chat):
    root, _ = tiny_chat
    tokenizer = jaxlora.load(root / "jax").tokenizer
    ids, mask = tokenize({"prompt": "What is 2 plus 2?", "completion": " 4"}, tokenizer)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(learned) == " 4" + tokenizer.eos_token
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m]) == "What is 2 plus 2?"
    messages = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Hello!"},
    ]
    ids, mask = tokenize({"messages": messages}, tokenizer)
    learned = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "Hi there!" in learned and "Hello!" in learned
    assert "Say hi." not in learned and "Again." not in learned and "user" not in learned
    ids, mask = tokenize({"text": "all of it"}, tokenizer)
    assert all(mask)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{not json}\n', r"train\.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"question": "?"}\n', r"train\.jsonl:2: expected"),
        ("\n\n", "holds no examples"),
    ],
)
def test_malformed_data_lines(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(UsageError, match=message):
        read_examples(tmp_path / "train.jsonl")


def test_packed_batches_hold_whole_documents_and_lose_nothing(tiny_chat):
    """Each example's tokens and loss mask land exactly once, in order, as one segment of a row (the examples here
    are shorter than a row); the loss over all packed rows is the sum of each example's loss alone."""
    root, _ = tiny_chat
    model = jaxlora.load(root / "jax")
    examples = read_examples(root / "train.jsonl")
    packed = Batches(examples, model.tokenizer, seq_len=48, seed=0)
    encoded = [tokenize(e, model.tokenizer) for e in examples]
    found = []
    for ids, mask, loss_mask, segments in zip(
        packed.input_ids, packed.attention_mask, packed.loss_mask, packed.segment_ids, strict=True
    ):
        assert np.array_equal(mask, segments > 0)
        for s in range(1, segments.max() + 1):
            where = segments == s
            assert np.all(np.diff(np.flatnonzero(where)) == 1)  # contiguous
            found.append((ids[where].tolist(), loss_mask[where].tolist()))
    assert sorted(found) == sorted((list(i), list(m)) for i, m in encoded)
    assert len(packed) < len(examples)  # several examples share a row
    everything = packed.rows(0, len(packed))
    total, count = token_loss(model.params, model.config, everything)
    want_total, want_count = 0.0, 0.0
    for ids, mask in encoded:
        alone = {
            "input_ids": np.asarray([ids]),
            "attention_mask": np.ones((1, len(ids))),
            "loss_mask": np.asarray([mask]),
        }
        t, c = token_loss(model.params, model.config, alone)
        want_total, want_count = want_total + float(t), want_count + float(c)
    assert float(count) == want_count
    assert float(total) == pytest.approx(want_total, rel=1e-5)


def test_train_step_changes_only_the_adapters_and_learns(tiny_chat):
    root, _ = tiny_chat
    model = jaxlora.load(root / "jax")
    batches = Batches(read_examples(root / "train.jsonl"), model.tokenizer, seq_len=32, seed=1)
    base_before = jax.tree.map(np.array, model.params)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = lora.init(model.config, jax.random.key(0), rank=8, targets=targets)
    optimizer = make_optimizer(1e-1, 30, warmup_steps=2)
    step = make_train_step(model.params, model.config, optimizer)
    state = init_state(adapters, optimizer, jax.random.key(1))
    fixed = batches.batch(0, 4, 1)
    losses = []
    for _ in range(30):
        state, metrics = step(state, fixed)
        losses.append(float(metrics["loss"]))
    # A random tiny model starts near uniform (ln 49152 = 10.8) and its small normalized hidden state times
    # 0.02-scale tied embeddings caps how far adapters alone can move the logits: down, but slowly.
    assert losses[-1] < losses[0] - 0.2, losses
    assert int(state.step) == 30
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))  # bitwise: the base never moves
    # The optimizer holds moments for the adapters only, never for the base params.
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters.weights))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0)
    assert n_opt == 2 * n_adapter


def test_full_fine_tuning_memorizes_a_batch(tiny_chat):
    root, _ = tiny_chat
    model = jaxlora.load(root / "jax")
    batch = Batches(read_examples(root / "train.jsonl"), model.tokenizer, seq_len=32, seed=1).batch(0, 4, 1)
    optimizer = make_optimizer(1e-2, 40, warmup_steps=2)
    step = make_train_step(model.params, model.config, optimizer, full=True, remat=True)
    state = init_state(jax.tree.map(lambda x: x.copy(), model.params), optimizer, jax.random.key(1))
    first = None
    for _ in range(40):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first - 3.0


def test_gradient_accumulation_equals_one_big_batch(tiny_chat):
    root, _ = tiny_chat
    model = jaxlora.load(root / "jax")
    batches = Batches(read_examples(root / "train.jsonl"), model.tokenizer, seq_len=32, seed=2)
    adapters = lora.init(model.config, jax.random.key(0), rank=4, targets=("q_proj", "v_proj"))
    adapters = adapters.replace(weights=jax.tree.map(lambda x: x + 0.01, adapters.weights))
    optimizer = make_optimizer(1e-2, 10)
    step = make_train_step(model.params, model.config, optimizer)
    fresh = lambda: init_state(jax.tree.map(lambda x: x.copy(), adapters), optimizer, jax.random.key(0))  # noqa: E731
    whole, whole_metrics = step(fresh(), batches.batch(0, 4, 1))  # the step donates its state: one copy each
    split, split_metrics = step(fresh(), batches.batch(0, 2, 2))
    for a, b in zip(jax.tree.leaves(whole.trainable), jax.tree.leaves(split.trainable), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # Adam's first step barely sees the gradient's scale, so compare the gradient itself: the mean over every target
    # token of the step, computed here in one piece.
    flat = batches.batch(0, 4, 1)
    flat = {k: v[0] for k, v in flat.items()}

    def mean_loss(weights):
        total, count = token_loss(model.params, model.config, flat, adapters.replace(weights=weights))
        return total / count

    expected = optax.global_norm(jax.jit(jax.grad(mean_loss))(adapters.weights))
    for metrics in (whole_metrics, split_metrics):
        assert float(metrics["grad_norm"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(metrics["loss"]) == pytest.approx(float(jax.jit(mean_loss)(adapters.weights)), rel=1e-5)


def finetune(root, out, *extra, data="train.jsonl"):
    return [
        sys.executable,
        "-m",
        "jaxlora",
        "finetune",
        str(root / "jax"),
        "--data",
        str(root / data),
        "--out",
        str(out),
        "--steps",
        "8",
        "--save-every",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--rank",
        "4",
        *extra,
    ]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_a_run_killed_mid_way_and_resumed_ends_where_an_uninterrupted_one_does(tiny_chat, tmp_path, objective):
    root, _ = tiny_chat
    data = "train.jsonl" if objective == "sft" else "pairs.jsonl"
    finetune = partial(run_command, objective=objective, data=data)
    whole = subprocess.run(finetune(root, tmp_path / "whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    proc = subprocess.Popen(
        finetune(root, tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in proc.stdout:
            if "saved checkpoint at step 4" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()

    again = subprocess.run(finetune(root, tmp_path / "killed"), capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "pass --resume" in again.stderr
    resumed = subprocess.run(
        finetune(root, tmp_path / "killed", "--resume"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 4" in resumed.stdout or "resumed from step 6" in resumed.stdout

    config = jaxlora.load(root / "jax").config
    a = load_adapters(tmp_path / "whole" / "final", config)
    b = load_adapters(tmp_path / "killed" / "final", config)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(a.weights)) > 0


def run_command(root, out, *extra, objective, data):
    """A finetune command with this objective; pairs get rows of 64 tokens (SmolLM2's chat template adds a system
    prompt of about 30)."""
    longer = () if objective == "sft" else ("--seq-len", "64")
    return finetune(root, out, "--objective", objective, *longer, *extra, data=data)


def export_and_compare_in_peft(root, torch_model, adapters_dir, peft_dir, seed=0):
    """`jaxlora lora export` the adapters; PEFT applies them to the float torch model and gives jaxlora's logits of
    the float base with those adapters (1e-4). Returns the base model and the adapters."""
    import copy

    import torch
    from peft import PeftModel

    export = subprocess.run(
        [sys.executable, "-m", "jaxlora", "lora", "export", str(adapters_dir), str(peft_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    model = jaxlora.load(root / "jax")
    adapters = load_adapters(adapters_dir, model.config)
    ids = np.random.default_rng(seed).integers(0, 49152, (2, 12)).astype(np.int32)
    ours = np.asarray(jaxlora.forward(model.params, model.config, ids, lora=adapters))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(torch_model), str(peft_dir)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    return model, adapters


def test_cli_export_loads_in_peft_and_import_round_trips(tiny_chat, tmp_path):
    root, torch_model = tiny_chat
    run = subprocess.run(
        finetune(root, tmp_path / "run", "--targets", "q_proj,v_proj,down_proj"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    model, adapters = export_and_compare_in_peft(root, torch_model, tmp_path / "run" / "final", tmp_path / "peft")

    back = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlora",
            "lora",
            "import",
            str(tmp_path / "peft"),
            str(tmp_path / "back"),
            "--base",
            str(root / "jax"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert back.returncode == 0, back.stderr[-2000:]
    again = load_adapters(tmp_path / "back", model.config)
    for x, y in zip(jax.tree.leaves(adapters.weights), jax.tree.leaves(again.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlora",
            "generate",
            str(root / "jax"),
            "--prompt",
            "What is 5 plus 5?",
            "--max-new-tokens",
            "8",
            "--lora",
            str(tmp_path / "peft"),
            "--no-compile-cache",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    # The text is what the adapted model says, in-process, and not what the base model says.
    prompt = [model.tokenizer("What is 5 plus 5?")["input_ids"]]
    texts = {}
    for name, params in (("adapted", lora.merge(model.params, adapters)), ("base", model.params)):
        out = jaxlora.generate(params, model.config, prompt, max_new_tokens=8, eos_token_ids=model.eos_token_ids)
        texts[name] = model.tokenizer.decode(out.tokens[0, : out.lengths[0]], skip_special_tokens=True)
    assert generated.stdout.strip() == texts["adapted"].strip() != texts["base"].strip()


def test_preference_pairs_mask_each_response_and_keep_its_prompt(tiny_chat, tmp_path):
    root, _ = tiny_chat
    tokenizer = jaxlora.load(root / "jax").tokenizer
    pairs = read_pairs(root / "pairs.jsonl")
    data = PreferencePairs(pairs, tokenizer, seq_len=48, seed=0)
    batch = data.batch(0, 2, 3)
    assert batch["input_ids"].shape == (3, 4, 48)
    rows = data.rows(0, len(data))
    n = len(data)
    for i in range(n):
        chosen, rejected = (rows["input_ids"][r][rows["loss_mask"][r] == 1] for r in (i, n + i))
        prompt_c, prompt_r = (
            rows["input_ids"][r][(rows["loss_mask"][r] == 0) & (rows["attention_mask"][r] == 1)] for r in (i, n + i)
        )
        assert np.array_equal(prompt_c, prompt_r)  # one prompt, two responses
        text = tokenizer.decode(chosen)
        assert ("It is" in text or "Hi there!" in text) and tokenizer.eos_token in text
        assert not np.array_equal(chosen, rejected)
    # The conversational pair: the response is the assistant turn alone, the user turn is prompt.
    conversational = PreferencePairs(pairs[-1:], tokenizer, seq_len=64)
    row = conversational.rows(0, 1)
    learned = tokenizer.decode(row["input_ids"][0][row["loss_mask"][0] == 1])
    assert "Hi there!" in learned and "Say hi." not in learned
    whole = {"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B"}]}
    whole["rejected"] = [whole["chosen"][0], {"role": "assistant", "content": "C"}]
    (tmp_path / "implicit.jsonl").write_text(json.dumps(whole) + "\n" + json.dumps({"prompt": "x", "chosen": 1}) + "\n")
    with pytest.raises(UsageError, match="implicit.jsonl:2: expected"):
        read_pairs(tmp_path / "implicit.jsonl")
    (tmp_path / "implicit.jsonl").write_text(json.dumps(whole) + "\n")
    assert read_pairs(tmp_path / "implicit.jsonl")[0]["prompt"] == whole["chosen"][:1]
    with pytest.raises(UsageError, match="pair 1: no chosen response token fits in --seq-len 4"):
        PreferencePairs(pairs[:1], tokenizer, seq_len=4)


def test_dpo_run_learns_the_pairs_and_reports_its_metrics(tiny_chat, tmp_path):
    root, _ = tiny_chat
    command = run_command(
        root,
        tmp_path / "run",
        "--eval-data",
        str(root / "pairs.jsonl"),
        "--eval-every",
        "4",
        "--beta",
        "0.5",
        objective="dpo",
        data="pairs.jsonl",
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [line for line in result.stdout.splitlines() if "eval loss" in line]
    assert [r.split(":")[0] for r in reports] == ["step 4", "step 8"]
    loss, margin, accuracy = zip(
        *(
            (
                float(r.split("eval loss ")[1].split(",")[0]),
                float(r.split("margin ")[1].split(",")[0]),
                float(r.split("accuracy ")[1]),
            )
            for r in reports
        ),
        strict=True,
    )
    # DPO starts at log 2 = 0.693 with a zero margin (the adapters start at zero: policy = reference).
    assert loss[1] < loss[0] < 0.69 and 0.1 < margin[0] < margin[1] and accuracy[1] == 1.0, reports
    assert (tmp_path / "run" / "final" / "lora_config.json").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["objective"] == "dpo"


def test_finetune_bad_arguments(tiny_chat, tmp_path):
    root, _ = tiny_chat
    for extra, message in (
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "-1"], "--lr must be"),
        (["--objective", "dpo", "--beta", "0"], "--beta must be a positive number"),
        (["--objective", "ipo", "--label-smoothing", "0.1"], "--label-smoothing applies to dpo and simpo"),
        (["--objective", "dpo", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
        (["--objective", "orpo"], 'expected {"prompt", "chosen", "rejected"}'),
    ):
        result = subprocess.run(finetune(root, tmp_path / "bad", *extra), capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr and message in result.stderr


def test_eval_data_reports_loss_and_perplexity(tiny_chat, tmp_path):
    root, _ = tiny_chat
    (tmp_path / "eval.txt").write_text("What is 3 plus 3? It is 6. What is 4 plus 4? It is 8.")
    result = subprocess.run(
        finetune(root, tmp_path / "run", "--eval-data", str(tmp_path / "eval.txt"), "--eval-every", "4", "--keep", "1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [line for line in result.stdout.splitlines() if "eval loss" in line]
    assert [r.split(":")[0] for r in reports] == ["step 4", "step 8"]
    loss, perplexity = (float(x) for x in reports[-1].replace(",", "").split("eval loss ")[1].split(" perplexity "))
    assert abs(np.exp(loss) - perplexity) < 0.01 * perplexity
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["8"]


def test_finetune_on_a_mesh_matches_one_device(tiny_chat, tmp_path):
    import os

    root, _ = tiny_chat
    one = subprocess.run(
        finetune(root, tmp_path / "one", "--steps", "3", "--save-every", "3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"}
    mesh = subprocess.run(
        finetune(root, tmp_path / "mesh", "--steps", "3", "--save-every", "3", "--mesh", "data=2,tensor=2"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert one.returncode == 0 and mesh.returncode == 0, mesh.stderr[-2000:]
    config = jaxlora.load(root / "jax").config
    a = load_adapters(tmp_path / "one" / "final", config)
    b = load_adapters(tmp_path / "mesh" / "final", config)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)


def test_finetune_cli_options_reach_the_step(tiny_chat, tmp_path):
    """--pad, --remat and --dtype bfloat16 through the CLI: remat recomputes, so it changes no number (beyond
    float32 fusion order); bfloat16 compute is not the float32 run; --full writes a whole checkpoint whose params
    all moved."""
    root, _ = tiny_chat
    runs = {
        "remat": ["--pad", "--remat"],
        "float32": ["--pad"],
        "bfloat16": ["--pad", "--dtype", "bfloat16"],
        "full": ["--full", "--steps", "4", "--save-every", "4", "--lr", "1e-3"],
    }
    for name, flags in runs.items():
        result = subprocess.run(finetune(root, tmp_path / name, *flags), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (name, result.stderr[-2000:])
    meta = json.loads((tmp_path / "bfloat16" / "run.json").read_text())
    assert (meta["pack"], meta["remat"], meta["dtype"]) == (False, False, "bfloat16")
    model = jaxlora.load(root / "jax")
    final = {
        n: jax.tree.leaves(load_adapters(tmp_path / n / "final", model.config).weights) for n in runs if n != "full"
    }
    for a, b in zip(final["remat"], final["float32"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    pairs = zip(final["bfloat16"], final["float32"], strict=True)
    assert max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in pairs) > 1e-4
    full = jaxlora.load(tmp_path / "full" / "final")
    assert full.tokenizer is not None
    pairs = zip(jax.tree.leaves(full.params), jax.tree.leaves(model.params), strict=True)
    assert min(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in pairs) > 0, (
        "a --full run left params as they were"
    )


def test_train_step_compiles_once_and_leaves_the_callers_arrays_alive(tiny, caplog):
    model = tiny("llama-gqa").load()
    adapters = lora.init(model.config, jax.random.key(0), rank=4)
    before = jax.tree.map(np.array, adapters.weights)
    key = jax.random.key(1)
    optimizer = make_optimizer(1e-2, 10)
    step = make_train_step(model.params, model.config, optimizer)
    state = init_state(adapters, optimizer, key)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 2, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                state, _ = step(state, batch)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r for r in caplog.records if "Compiling jit(step)" in r.getMessage()]
    assert len(compiles) == 1
    # The state was donated three times; the adapters and key the caller passed in are untouched and usable.
    for old, now in zip(jax.tree.leaves(before), jax.tree.leaves(adapters.weights), strict=True):
        np.testing.assert_array_equal(old, np.asarray(now))
    jax.random.split(key)
    assert not np.array_equal(np.asarray(jax.tree.leaves(state.trainable.weights)[0]), jax.tree.leaves(before)[0])


def test_qlora_trains_adapters_over_an_int4_base_and_exports_them_for_the_float_model(tiny_chat, tmp_path):
    root, torch_model = tiny_chat
    options = ("--quantize", "int4:16", "--targets", "q_proj,v_proj,down_proj", "--lr", "1e-2", "--steps", "4")
    evals = ("--eval-data", str(root / "train.jsonl"), "--eval-every", "2", "--save-every", "4")
    run = subprocess.run(
        finetune(root, tmp_path / "run", *options, *evals), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [
        float(line.split("eval loss ")[1].split(",")[0]) for line in run.stdout.splitlines() if "eval loss" in line
    ]
    assert len(losses) == 2 and losses[1] < losses[0]
    # The adapters were trained against the int4 base, and apply to the float model as PEFT adapters do.
    export_and_compare_in_peft(root, torch_model, tmp_path / "run" / "final", tmp_path / "peft", seed=1)
    full = subprocess.run(
        finetune(root, tmp_path / "bad", "--quantize", "int8", "--full"), capture_output=True, text=True
    )
    assert full.returncode == 1 and "needs a float checkpoint" in full.stderr and "Traceback" not in full.stderr


def test_full_fine_tuning_of_a_scanned_model_writes_the_per_layer_checkpoint(tiny_chat, tmp_path):
    """`finetune --full --scan-layers on` trains the stacked params and writes them one group per layer: the same
    checkpoint (1e-5) as the unrolled run, loadable either way."""
    from jaxlora.trainer import RunOptions, run

    root, _ = tiny_chat
    finals = {}
    for layout in ("off", "on"):
        options = RunOptions(
            data=str(root / "train.jsonl"),
            out=str(tmp_path / layout),
            steps=3,
            batch_size=2,
            seq_len=32,
            learning_rate=1e-3,
            warmup_steps=0,
            full=True,
            save_every=100,
            scan_layers=layout,
        )
        finals[layout] = run(str(root / "jax"), options, log=lambda _: None)
    unrolled = jaxlora.load(finals["off"], scan_layers=False)
    scanned = jaxlora.load(finals["on"], scan_layers=False)
    assert sorted(scanned.params) == sorted(unrolled.params)
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(unrolled.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    base = jaxlora.load(root / "jax")
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), base.params, unrolled.params)
    )
    assert max(moved) > 1e-4


def test_a_run_resumes_in_its_own_layout(tiny_chat, tmp_path):
    """A LoRA run started scanned and resumed with --scan-layers off continues in its own (scanned) layout, from
    its checkpoint, and ends where one uninterrupted run does."""
    from jaxlora.trainer import RunOptions, run

    root, _ = tiny_chat
    common = dict(data=str(root / "train.jsonl"), batch_size=2, seq_len=32, warmup_steps=0, save_every=2)
    whole = run(str(root / "jax"), RunOptions(out=str(tmp_path / "whole"), steps=4, scan_layers="on", **common))

    def stop_after_step_2(line):  # Ctrl-C right after the step-2 checkpoint is saved
        if "saved checkpoint at step 2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(
            str(root / "jax"),
            RunOptions(out=str(tmp_path / "split"), steps=4, scan_layers="on", **common),
            log=stop_after_step_2,
        )
    said = []
    split = run(
        str(root / "jax"),
        RunOptions(out=str(tmp_path / "split"), steps=4, scan_layers="off", resume=True, **common),
        log=said.append,
    )
    assert any("resuming with the run's scanned layers" in line for line in said)
    assert any("resumed from step 2" in line for line in said)
    config = jaxlora.load(root / "jax").config
    a, b = load_adapters(whole, config), load_adapters(split, config)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
