"""`jaxlora eval`: an application on top of the model. Perplexity over a text (`perplexity`), diversity of samples
and code pass@k in a sandbox (`samples`), with the pure metrics in `metrics` and the sandbox in `sandbox`.

`read_inputs` reads every input before the model loads; `run` computes what was asked; `table` lays the report
out as rows for printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax

from jaxlora.checkpoint import Model
from jaxlora.errors import UsageError
from jaxlora.eval import sandbox
from jaxlora.eval.inputs import check_ks, read_lines, read_problems, read_text
from jaxlora.eval.perplexity import perplexity
from jaxlora.eval.samples import code_pass_at_k, diversity
from jaxlora.sampling import Sampling

DEFAULT_WINDOW = 1024


@dataclass(frozen=True)
class EvalInputs:
    text: str | None = None  # perplexity
    prompts: list[str] | None = None  # diversity
    problems: list[dict] | None = None  # code pass@k


@dataclass(frozen=True)
class EvalOptions:
    window: int | None = None  # perplexity: tokens per window (None: min(context, 1024, the text))
    stride: int | None = None  # perplexity: tokens between window starts (None: window / 2)
    batch_size: int = 4  # perplexity: windows per jitted call
    samples: int = 10  # per prompt / problem
    ks: tuple[int, ...] = (1, 10)
    max_new_tokens: int = 128
    timeout: float = 5.0  # code: seconds per program run
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.8))
    seed: int = 0
    unsafe_no_sandbox: bool = False  # code: run generated code unisolated where no sandbox can be built

    def check(self, inputs: EvalInputs) -> None:
        if self.batch_size < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise UsageError("--batch-size, --samples and --max-new-tokens must be positive")
        if self.window is not None and self.window < 2:
            raise UsageError(f"--window must be at least 2 tokens, got {self.window}")
        if self.stride is not None and self.stride < 1:
            raise UsageError(f"--stride must be a positive number of tokens, got {self.stride}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise UsageError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if inputs.problems is not None:
            check_ks(list(self.ks), self.samples)
            sandbox.check_available(self.unsafe_no_sandbox)
        self.sampling.per_row(1)


def parse_ks(text: str) -> tuple[int, ...]:
    """ "1,10" -> (1, 10)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--k takes comma-separated numbers, got {text!r}") from None


def read_inputs(perplexity: str | None = None, diversity: str | None = None, code: str | None = None) -> EvalInputs:
    """The files to evaluate on: a text to score, prompts (one per line), HumanEval-format problems."""
    if not (perplexity or diversity or code):
        raise UsageError("give at least one of --perplexity FILE, --diversity PROMPTS, --code-pass-at-k PROBLEMS")
    text = None
    if perplexity:
        text = read_text(perplexity)
        if not text.strip():
            raise UsageError(f"{perplexity} holds no text")
    return EvalInputs(
        text=text,
        prompts=read_lines(diversity, "prompts") if diversity else None,
        problems=read_problems(code) if code else None,
    )


def run(model: Model, inputs: EvalInputs, options: EvalOptions) -> dict:
    """{"perplexity": ..., "diversity": ..., "code": ...} for the inputs given."""
    options.check(inputs)
    if model.tokenizer is None:
        raise UsageError(f"{model.path} has no tokenizer to read the text with")
    key = jax.random.key(options.seed)
    report = {}
    if inputs.text is not None:
        tokens = model.tokenizer(inputs.text)["input_ids"]
        # The default window fits the model and the text; the stride follows the window (and shrinks with it).
        window = options.window or min(model.config.context_length or DEFAULT_WINDOW, DEFAULT_WINDOW, len(tokens))
        stride = options.stride or max(window // 2, 1)
        if options.window is None:
            stride = min(stride, window)
        result = perplexity(
            model.params, model.config, tokens, window=window, stride=stride, batch_size=options.batch_size
        )
        report["perplexity"] = {**result, "window": window, "stride": stride}
    generation = dict(samples=options.samples, max_new_tokens=options.max_new_tokens, sampling=options.sampling)
    if inputs.prompts is not None:
        report["diversity"] = diversity(model, inputs.prompts, key=key, **generation)
    if inputs.problems is not None:
        report["code"] = code_pass_at_k(
            model,
            inputs.problems,
            ks=list(options.ks),
            timeout=options.timeout,
            unsafe=options.unsafe_no_sandbox,
            key=key,
            **generation,
        )
    return report


def table(report: dict) -> list[tuple[str, str, str]]:
    """The report as (metric group, name, value) rows."""
    rows = []
    if "perplexity" in report:
        p = report["perplexity"]
        rows += [
            ("perplexity", "tokens scored", f"{p['tokens']}"),
            ("perplexity", "window / stride", f"{p['window']} / {p['stride']} ({p['windows']} windows)"),
            ("perplexity", "loss (nats/token)", f"{p['loss']:.4f}"),
            ("perplexity", "perplexity", f"{p['perplexity']:.3f}"),
        ]
    if "diversity" in report:
        d = report["diversity"]
        rows += [("diversity", "prompts x samples", f"{d['prompts']} x {d['samples']}")]
        rows += [("diversity", name, f"{d[name]:.4f}") for name in ("distinct_1", "distinct_2", "distinct_3")]
        rows += [("diversity", "self_bleu", f"{d['self_bleu']:.4f}")]
    if "code" in report:
        c = report["code"]
        rows += [("code", "problems x samples", f"{c['problems']} x {c['samples']}")]
        rows += [("code", name, f"{value:.4f}") for name, value in c.items() if name.startswith("pass@")]
    return rows
