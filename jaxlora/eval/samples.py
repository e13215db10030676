"""Metrics over sampled text: diversity of samples (distinct-n, self-BLEU) and code pass@k in the sandbox."""

from __future__ import annotations

import jax
import numpy as np

from jaxlora.errors import UsageError
from jaxlora.eval import metrics
from jaxlora.eval.inputs import check_ks
from jaxlora.eval.sandbox import run_program
from jaxlora.generate import generate
from jaxlora.text import pad_id

# HumanEval's stop sequences: a completion ends where the function body does.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


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
        pad_token_id=pad_id(model.tokenizer),
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
    model,
    problems: list[dict],
    *,
    samples: int,
    ks: list[int],
    max_new_tokens: int,
    sampling,
    key,
    timeout: float,
    unsafe: bool = False,
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
        outcomes = [run_program(program_for(problem, truncate_at_stops(t)), timeout, unsafe=unsafe) for t in texts]
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
