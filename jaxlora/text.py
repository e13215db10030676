"""Text in and out through an HF tokenizer: chat templates, the pad id, and text streamed as tokens arrive."""

from __future__ import annotations

import sys
from pathlib import Path

from jaxlora.errors import UsageError


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (padding is masked out, so any id would do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """A conversation [{"role", "content"}, ...] rendered by the tokenizer's chat template, as token ids."""
    if not has_chat_template(tokenizer):
        raise UsageError("chat needs a tokenizer with a chat template")
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    )


def prompt_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """A prompt as token ids: the text as is, or (chat) as one user message ready for the assistant's reply."""
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text)["input_ids"])


def read_prompts(prompt: str | None, prompt_file: str | None, batch_file: str | None) -> list[str]:
    """The prompts of a generate call: one given, one file as one prompt, or one prompt per non-blank line."""
    given = [value for value in (prompt, prompt_file, batch_file) if value is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --prompt, --prompt-file, --batch-file")
    if prompt is not None:
        return [prompt]
    path = prompt_file or batch_file
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path} ({e})") from None
    if prompt_file is not None:
        return [text]
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one per line)")
    return prompts


class TextStream:
    """Prints a row's text as its tokens arrive (decoding the whole row each time keeps multi-byte pieces whole)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = ""

    def add(self, tokens) -> None:
        self.tokens.extend(int(t) for t in tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text
