"""lm-evaluation-harness in process: `--model jaxlora`, with no server in between.

Importing this module registers the model with lm_eval (`lm_eval` has no plugin entry point for models), so:

    python -m jaxlora.eval.harness --model jaxlora --model_args checkpoint=checkpoints/NAME --tasks hellaswag

runs lm_eval's own command line with it, and from Python:

    import jaxlora.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="jaxlora", model_args="checkpoint=checkpoints/NAME", tasks=[...])

Requests are encoded as lm_eval's API models encode them for `local-completions` against `jaxlora serve`
(the same `max_length`, truncation and rolling windows), so both ways give the same numbers: loglikelihood
from one batched forward per group of requests, generate_until on the serving engine (continuous batching).
Model arguments: checkpoint, max_length (default min(context, 2048)), max_gen_toks (256), dtype, add_bos_token.
"""

from __future__ import annotations

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxlora.checkpoint import load
from jaxlora.engine import Engine
from jaxlora.errors import UsageError
from jaxlora.losses import next_token_logprobs
from jaxlora.model import forward
from jaxlora.sampling import Sampling


@partial(jax.jit, static_argnames=("config",))
def _target_scores(params, ids, mask, *, config):
    """ids/mask [batch, seq] -> (log p(ids[:, t + 1] | ids[:, ..t]), whether ids[:, t + 1] is the most likely
    token there) [batch, seq - 1], in float32."""
    logits = forward(params, config, ids, attention_mask=mask)
    picked = jnp.take_along_axis(logits[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return next_token_logprobs(logits, ids), picked == jnp.max(logits[:, :-1], axis=-1)


def _length_bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("jaxlora")
class JaxloraLM(TemplateLM):
    """A converted checkpoint as an lm_eval model (see the module's docstring)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        dtype: str | None = None,
        add_bos_token: bool | str = False,
        max_batch: int | str = 8,
        **_ignored,  # lm_eval passes device, max_batch_size, ...: one process, JAX's devices
    ):
        super().__init__()
        if not checkpoint:
            raise UsageError("the jaxlora model needs model_args checkpoint=PATH")
        self.model = load(checkpoint, dtype=dtype)
        if self.model.tokenizer is None:
            raise UsageError(f"{checkpoint} has no tokenizer: lm_eval's tasks are text")
        self.tokenizer = self.model.tokenizer
        context = self.model.config.context_length or 2048
        # As lm_eval's API models: max_length - 1 tokens of input (one is left for the generated token).
        self.max_length = min(int(max_length or min(context, 2048)), context) - 1
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self.add_bos_token = _as_bool(add_bos_token)
        self.max_batch = int(max_batch)
        self._engine: Engine | None = None

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What conditions an empty context or a rolling window's first token: BOS, else EOS (as lm_eval's HF
        and API models)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = bool(add_special_tokens) or self.add_bos_token
        return list(self.tokenizer(string, add_special_tokens=special, return_attention_mask=False).input_ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each (_, context ids, continuation ids) -> (log p(continuation | context), whether it is greedy),
        the input left-truncated to max_length as lm_eval's API models do."""
        inputs = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-self.max_length :]
            start = len(whole) - len(continuation)  # the first continuation token's index in `whole`
            if start < 1:
                raise UsageError("a continuation longer than max_length leaves it no context")
            inputs.append((whole, start))
        results: list[tuple[float, bool]] = []
        for first in range(0, len(inputs), self.batch_size):
            batch = inputs[first : first + self.batch_size]
            width = _length_bucket(max(len(w) for w, _ in batch))
            ids = np.zeros((self.batch_size, width), np.int32)  # full batches: one program per width
            mask = np.zeros((self.batch_size, width), bool)
            for row, (whole, _) in enumerate(batch):
                ids[row, : len(whole)], mask[row, : len(whole)] = whole, True
            logprobs, greedy = jax.device_get(_target_scores(self.model.params, ids, mask, config=self.model.config))
            for row, (whole, start) in enumerate(batch):
                span = slice(start - 1, len(whole) - 1)  # entry t scores token t + 1
                results.append((float(logprobs[row, span].sum()), bool(greedy[row, span].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood over disjoint windows of max_length (lm_eval's rolling windows)."""
        totals = []
        for (text,) in [r.args for r in requests]:
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,
                    context_len=1,
                )
            ]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(windows)))
        return totals

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(
                self.model.params, self.model.config, max_batch=self.max_batch, max_len=self.max_length + 1
            )
        return self._engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) -> the text generated until one of `until` (not included), on the engine."""
        jobs = []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", kwargs.pop("max_tokens", self.max_gen_toks)))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not _as_bool(kwargs.pop("do_sample", False)):
                temperature = 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_tokens) :]
            request = dict(
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=Sampling(temperature=temperature),
                seed=1234,
                stop_token_ids=tuple(self.model.eos_token_ids),
            )
            jobs.append((request, until))
        outputs = self.engine.run([request for request, _ in jobs])
        texts = []
        for (_, until), tokens in zip(jobs, outputs.values(), strict=True):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line, with `--model jaxlora` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
