"""`jaxlora eval`: the metrics, the code sandbox, and perplexity on the real SmolLM2 against transformers."""

import inspect
import json
import math
import socket
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from bench_eval import hf_sliding_perplexity
from test_cli import assert_clean_error, run_cli

import jaxlora
from jaxlora.eval import metrics
from jaxlora.eval.inputs import read_problems
from jaxlora.eval.perplexity import perplexity, sliding_windows
from jaxlora.eval.samples import program_for, sample_texts, truncate_at_stops
from jaxlora.eval.sandbox import run_program

PROBLEMS = Path(__file__).parent / "data" / "code_problems.jsonl"
SOLUTIONS = {
    "add": "    return a + b\n",
    "is_even": "    return n % 2 == 0\n",
    "reverse_string": "    return s[::-1]\n",
    "maximum": "    return max(xs)\n",
}


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 4), (5, 5, 2), (7, 2, 7), (200, 17, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)


def test_distinct_n_and_self_bleu():
    same = [["the", "cat", "sat", "on", "the", "mat"]] * 3
    varied = [["the", "cat", "sat"], ["a", "dog", "ran", "off"], ["birds", "sing", "at", "dawn", "today"]]
    assert metrics.distinct_n(same, 1) == pytest.approx(5 / 18)
    assert metrics.distinct_n(varied, 2) == 1.0
    assert metrics.self_bleu(same) == pytest.approx(1.0)
    assert metrics.self_bleu(varied) < 0.1
    # BLEU of a hypothesis with half its bigrams in the reference, no brevity penalty.
    assert metrics.bleu(["a", "b", "c"], [["a", "b", "x", "y"]], max_n=2) == pytest.approx(
        math.sqrt(2 / 3 * 1 / 2) * math.exp(1 - 4 / 3)
    )


def test_sandbox_passes_fails_times_out_and_has_no_network():
    problems = read_problems(PROBLEMS)
    for problem in problems:
        assert run_program(program_for(problem, SOLUTIONS[problem["entry_point"]])).passed
        assert run_program(program_for(problem, "    return None\n")).status == "failed"
    assert run_program("while True:\n    pass\n", timeout=1).status == "timeout"
    # A listener of our own: the program must not reach it, by the socket module or by the raw _socket one.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for how in ("socket.create_connection(('127.0.0.1', PORT), timeout=2)",
                    "s = _socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', PORT))"):  # fmt: skip
            blocked = run_program(f"import socket, _socket\n{how.replace('PORT', str(port))}\n")
            assert blocked.status == "failed", how
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()
    # The program runs in its own temp folder: what it writes is gone and never lands here.
    wrote = run_program("open('sandbox_was_here.txt', 'w').write('x')\nimport os\nprint(os.getcwd())\n")
    assert wrote.passed and not Path("sandbox_was_here.txt").exists()


def test_completion_stops_at_the_next_top_level_statement():
    assert truncate_at_stops("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_at_stops("    return 1\nprint(add(1, 2))") == "    return 1"


def test_sliding_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 2), (5, 8, 3), (100, 32, 7)]:
        windows = sliding_windows(n, window, stride)
        scored = [t for w in windows for t in range(w.scored_from, w.end)]
        assert scored == list(range(1, n)), (n, window, stride)
        assert all(w.end - w.begin <= window for w in windows)
    # stride == window: disjoint windows, whose first tokens have no context to be predicted from (as in HF).
    windows = sliding_windows(11, 4, 4)
    assert [t for w in windows for t in range(w.scored_from, w.end)] == [1, 2, 3, 5, 6, 7, 9, 10]


@pytest.mark.real
def test_perplexity_matches_transformers_on_smollm2(smollm2):
    dst, reference = smollm2
    model = jaxlora.load(dst)
    text = inspect.getsource(textwrap)  # real English-and-code text, the same on every machine
    ids = np.asarray(model.tokenizer(text)["input_ids"][:700], np.int32)
    ours = perplexity(model.params, model.config, ids, window=256, stride=96, batch_size=3)
    theirs, counted = hf_sliding_perplexity(reference, ids, 256, 96)
    assert counted == ours["tokens"]
    assert ours["tokens"] == ids.size - 1
    assert abs(ours["perplexity"] - theirs) / theirs <= 1e-3, (ours, theirs)


@pytest.mark.real
def test_eval_cli_reports_every_metric_as_json(smollm2, tmp_path):
    """Each value in the report equals an independent computation: perplexity by transformers' recipe, distinct-n
    counted here over the same samples, pass@k by its combinatorial definition over the reported outcomes."""
    dst, reference = smollm2
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "prompts.txt").write_text("Once upon a time\nThe best way to learn\n")
    result = run_cli(
        "eval", dst, "--perplexity", tmp_path / "text.txt", "--window", "64", "--stride", "32",
        "--diversity", tmp_path / "prompts.txt", "--code-pass-at-k", PROBLEMS,
        "--samples", "2", "--k", "1,2", "--max-new-tokens", "24", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    model = jaxlora.load(dst)
    ids = np.asarray(model.tokenizer((tmp_path / "text.txt").read_text())["input_ids"], np.int32)
    theirs, counted = hf_sliding_perplexity(reference, ids, 64, 32)
    assert report["perplexity"]["tokens"] == counted == ids.size - 1
    assert abs(report["perplexity"]["perplexity"] - theirs) / theirs <= 1e-3

    key = jax.random.key(0)  # --seed 0
    sampling = jaxlora.Sampling(temperature=0.8)  # eval's default
    distinct = {n: [] for n in (1, 2, 3)}
    for i, prompt in enumerate(["Once upon a time", "The best way to learn"]):
        texts = sample_texts(model, prompt, 2, max_new_tokens=24, sampling=sampling, key=jax.random.fold_in(key, i))
        words = [t.split() for t in texts]
        for n in distinct:
            grams = [tuple(w[j : j + n]) for w in words for j in range(len(w) - n + 1)]
            distinct[n].append(len(set(grams)) / len(grams))
    for n, values in distinct.items():
        assert report["diversity"][f"distinct_{n}"] == pytest.approx(np.mean(values), abs=1e-9)

    code = report["code"]
    assert code["problems"] == 4 and len(code["per_problem"]) == 4
    assert all(s in ("passed", "failed", "timeout") for p in code["per_problem"] for s in p["statuses"])
    for k in (1, 2):
        exact = [1 - math.comb(2 - p["correct"], k) / math.comb(2, k) for p in code["per_problem"]]
        assert code[f"pass@{k}"] == pytest.approx(np.mean(exact), abs=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give at least one of --perplexity"),
        (["--perplexity", "/nonexistent.txt"], "cannot read /nonexistent.txt"),
        (["--code-pass-at-k", "BAD"], "BAD:2: not valid JSON"),
        (["--code-pass-at-k", "MISSING"], "MISSING:1: a problem needs prompt, test and entry_point"),
        (["--code-pass-at-k", str(PROBLEMS), "--samples", "2", "--k", "5"], "pass@5 needs 1 <= k <= --samples"),
    ],
)
def test_eval_bad_input(tiny, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "", "test": "", "entry_point": "f"}) + "\n{oops\n")
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "def f():\n"}) + "\n")
    args = [str(tmp_path / "bad.jsonl") if a == "BAD" else str(tmp_path / "missing.jsonl") if a == "MISSING" else a
            for a in args]  # fmt: skip
    message = message.replace("BAD", str(tmp_path / "bad.jsonl")).replace("MISSING", str(tmp_path / "missing.jsonl"))
    assert_clean_error(run_cli("eval", tiny("llama-gqa").jax_dir, *args), message)


@pytest.mark.real
def test_a_text_shorter_than_the_stride_shrinks_the_stride_with_the_window(tiny_with_tokenizer):
    from jaxlora import eval as evaluation

    model = jaxlora.load(tiny_with_tokenizer / "jax")
    inputs = evaluation.EvalInputs(text="A short text of a few words.")
    report = evaluation.run(model, inputs, evaluation.EvalOptions(stride=512))["perplexity"]
    tokens = len(model.tokenizer(inputs.text)["input_ids"])
    assert report["window"] == tokens and report["stride"] == tokens and report["tokens"] == tokens - 1
