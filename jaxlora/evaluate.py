"""`jaxlora eval`: perplexity over a text file with a sliding window, diversity of samples, and code pass@k.

Perplexity follows the sliding-window recipe of transformers' "Perplexity of fixed-length models": windows of
`window` tokens start every `stride` tokens; each window scores only the tokens the previous window did not
(the rest are context), so every token after the first is predicted once, with up to window - 1 tokens before
it. Windows are right-padded to one shape and scored in jitted batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import metrics
from jaxlora.config import ModelConfig
from jaxlora.data import jsonl_records
from jaxlora.errors import UsageError
from jaxlora.generate import generate
from jaxlora.model import forward
from jaxlora.sandbox import run_program

# HumanEval's stop sequences: a completion ends where the function body does.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the file
    end: int  # one past its last token
    scored_from: int  # tokens before this are context only


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """HF's recipe: begin at 0, stride, 2 * stride, ...; each window scores the tokens after the previous end."""
    if window < 2 or not 0 < stride <= window:
        raise UsageError(f"need window >= 2 and 0 < stride <= window, got window {window}, stride {stride}")
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append(Window(begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@partial(jax.jit, static_argnums=1)
def _window_nll(params, config: ModelConfig, ids, mask, scored):
    """ids/mask/scored [batch, window] -> summed negative log-likelihood of the scored tokens, per row."""
    logits = forward(params, config, ids, attention_mask=mask)[:, :-1]  # predicts tokens 1..
    targets = ids[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(scored[:, 1:], log_z - picked, 0.0), axis=-1)


def perplexity(params, config: ModelConfig, tokens, *, window: int, stride: int, batch_size: int = 4) -> dict:
    """tokens [n] int -> {"tokens" scored, "loss" (mean NLL per token, nats), "perplexity", "windows"}."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.size < 2:
        raise UsageError("perplexity needs at least 2 tokens of text")
    window = min(window, tokens.size)
    windows = sliding_windows(tokens.size, window, stride)
    total_nll, total_scored = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        ids = np.zeros((batch_size, window), np.int32)
        mask = np.zeros((batch_size, window), bool)
        scored = np.zeros((batch_size, window), bool)
        for row, w in enumerate(group):
            n = w.end - w.begin
            ids[row, :n] = tokens[w.begin : w.end]
            mask[row, :n] = True
            scored[row, w.scored_from - w.begin : n] = True
        total_nll += float(np.sum(_window_nll(params, config, ids, mask, scored)))
        total_scored += int(scored[:, 1:].sum())
    loss = total_nll / total_scored
    return {"tokens": total_scored, "loss": loss, "perplexity": math.exp(loss), "windows": len(windows)}


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def read_lines(path: str | Path, what: str) -> list[str]:
    """The file's non-blank lines, stripped; none is an error naming `what` was expected."""
    lines = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{path} holds no {what}")
    return lines


def read_problems(path: str | Path) -> list[dict]:
    """HumanEval-format JSONL: each line {"task_id"?, "prompt", "test", "entry_point"}; bad lines name file:line."""
    problems = []
    for number, problem in jsonl_records(path, read_text(path)):
        missing = [k for k in ("prompt", "test", "entry_point") if not isinstance(problem, dict) or k not in problem]
        if missing:
            raise UsageError(f"{path}:{number}: a problem needs prompt, test and entry_point (missing {missing[0]})")
        problem.setdefault("task_id", f"line {number}")
        problems.append(problem)
    if not problems:
        raise UsageError(f"{path} holds no problems")
    return problems


def check_ks(ks: list[int], samples: int) -> None:
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad:
        raise UsageError(f"pass@{bad[0]} needs 1 <= k <= --samples ({samples})")


def program_for(problem: dict, completion: str) -> str:
    """What the sandbox runs: the prompt, the completion, the problem's tests and the call of its check."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate_at_stops(text: str, stops=CODE_STOPS) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def sample_texts(model, prompt: str, n: int, *, max_new_tokens: int, sampling, key, stop=()) -> list[str]:
    """n samples of one prompt, batched as n rows with per-row keys."""
    ids = model.tokenizer(prompt)["input_ids"]
    out = generate(
        model.params,
        model.config,
        np.asarray([ids] * n, np.int32),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        key=key,
        eos_token_ids=model.eos_token_ids,
        stop=stop,
        tokenizer=model.tokenizer if stop else None,
        pad_token_id=model.tokenizer.pad_token_id or 0,
    )
    return [
        model.tokenizer.decode(row[:length], skip_special_tokens=True)
        for row, length in zip(out.tokens, out.lengths, strict=True)
    ]


def diversity(model, prompts: list[str], *, samples: int, max_new_tokens: int, sampling, key) -> dict:
    """distinct-1/2/3 and self-BLEU over each prompt's samples (words: whitespace-split text), averaged."""
    if samples < 2:
        raise UsageError("diversity needs at least 2 samples per prompt")
    scores = {"distinct_1": [], "distinct_2": [], "distinct_3": [], "self_bleu": []}
    for i, prompt in enumerate(prompts):
        texts = sample_texts(
            model, prompt, samples, max_new_tokens=max_new_tokens, sampling=sampling, key=jax.random.fold_in(key, i)
        )
        words = [t.split() for t in texts]
        for n in (1, 2, 3):
            scores[f"distinct_{n}"].append(metrics.distinct_n(words, n))
        scores["self_bleu"].append(metrics.self_bleu(words))
    return {"prompts": len(prompts), "samples": samples, **{k: float(np.mean(v)) for k, v in scores.items()}}


def code_pass_at_k(
    model, problems: list[dict], *, samples: int, ks: list[int], max_new_tokens: int, sampling, key, timeout: float
) -> dict:
    """Sample `samples` completions per problem, run each with its tests in the sandbox, estimate pass@k."""
    check_ks(ks, samples)
    results = []
    for i, problem in enumerate(problems):
        texts = sample_texts(
            model,
            problem["prompt"],
            samples,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            key=jax.random.fold_in(key, i),
            stop=CODE_STOPS,
        )
        outcomes = [run_program(program_for(problem, truncate_at_stops(t)), timeout) for t in texts]
        correct = sum(o.passed for o in outcomes)
        results.append(
            {
                "task_id": problem["task_id"],
                "correct": correct,
                "samples": samples,
                "statuses": [o.status for o in outcomes],
            }
        )
    pass_at = {f"pass@{k}": float(np.mean([metrics.pass_at_k(samples, r["correct"], k) for r in results])) for k in ks}
    return {"problems": len(problems), "samples": samples, **pass_at, "per_problem": results}
