"""lm-evaluation-harness against jaxlora two ways, on three small local tasks (tests/data/harness: multiple choice,
generation until a stop string, rolling log-likelihood; JSONL files, no hub access): lm_eval's own
`local-completions` client against `jaxlora serve`, and the in-process `--model jaxlora`
(`python -m jaxlora.eval.harness`). Both must report the same metrics and the same per-document answers."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")  # a dev dependency: `make test` installs it
pytest.importorskip("openai")

from servers import Server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = "jaxlora_mc,jaxlora_gen,jaxlora_rolling"


def lm_eval(module: str, model: str, model_args: str, out: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Run lm_eval's command line (through `module`) on the three tasks: (results, {task: samples})."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
        TOKENIZERS_PARALLELISM="false",
    )
    command = [sys.executable, "-m", module, "--model", model, "--model_args", model_args, "--tasks", TASKS]
    command += ["--include_path", "tests/data/harness", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = glob.glob(f"{out}/**/results_*.json", recursive=True)
    samples = {}
    for path in glob.glob(f"{out}/**/samples_*.jsonl", recursive=True):
        task = Path(path).name.split("samples_")[1].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    return json.loads(Path(results).read_text())["results"], samples


def test_lm_eval_through_the_server_equals_lm_eval_in_process(tiny_with_tokenizer, tmp_path):
    checkpoint = tiny_with_tokenizer / "jax"
    server = Server(checkpoint, "--max-batch", "4", "--max-len", "128")
    try:
        args = f"model=m,base_url={server.base}/v1/completions,tokenizer={checkpoint / 'tokenizer'}"
        args += ",tokenizer_backend=huggingface,max_length=128"
        served, served_samples = lm_eval("lm_eval", "local-completions", args, tmp_path / "served", tmp_path)
    finally:
        err = server.stop()
    assert "Traceback" not in err, err[-3000:]
    local, local_samples = lm_eval(
        "jaxlora.eval.harness", "jaxlora", f"checkpoint={checkpoint},max_length=128", tmp_path / "local", tmp_path
    )
    assert served["jaxlora_mc"]["acc,none"] == local["jaxlora_mc"]["acc,none"]
    assert served["jaxlora_mc"]["acc_norm,none"] == local["jaxlora_mc"]["acc_norm,none"]
    assert served["jaxlora_gen"]["exact_match,none"] == local["jaxlora_gen"]["exact_match,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert served["jaxlora_rolling"][metric] == pytest.approx(local["jaxlora_rolling"][metric], rel=1e-5)
    # Per document: each choice's log-likelihood (1e-4) and greedy flag, each generated text, each text's total.
    assert len(local_samples["jaxlora_mc"]) == 12 and len(local_samples["jaxlora_gen"]) == 6
    for a, b in zip(served_samples["jaxlora_mc"], local_samples["jaxlora_mc"], strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            assert float(ll_a) == pytest.approx(float(ll_b), abs=1e-4) and greedy_a == greedy_b
    generated = [s["filtered_resps"] for s in local_samples["jaxlora_gen"]]
    assert generated == [s["filtered_resps"] for s in served_samples["jaxlora_gen"]]
    assert any(text[0] for text in generated)  # something was generated, not only empty answers
    for a, b in zip(served_samples["jaxlora_rolling"], local_samples["jaxlora_rolling"], strict=True):
        assert float(a["filtered_resps"][0]) == pytest.approx(float(b["filtered_resps"][0]), rel=1e-5)
