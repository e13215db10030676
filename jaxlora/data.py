"""Training data: text or JSONL files -> token ids with a loss mask -> fixed-length batches.

Formats: a plain text file (one stream, loss everywhere); JSONL lines of {"text": ...} (loss everywhere),
{"prompt": ..., "completion": ...} (loss on the completion only) or {"messages": [...]} (the chat template;
loss on the assistant turns only). Examples are packed whole into `seq_len` rows (several documents may share a
row, each attending only to itself) or padded one per row. Batches come in a fixed order from a seed, so a run
resumed at a `position` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import UsageError
from jaxlora.text import chat_ids, pad_id


def jsonl_records(path: str | Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of `text`; a line that is not JSON is a file:line error."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def read_data_file(path: str | Path) -> tuple[Path, str]:
    """(the path, its text), or one UsageError: missing, or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such data file: {path}")
    try:
        return path, path.read_text()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e})") from None


def read_examples(path: str | Path) -> list[dict]:
    path, text = read_data_file(path)
    if path.suffix != ".jsonl":
        if not text.strip():
            raise UsageError(f"{path} is empty")
        return [{"text": text}]
    examples = []
    for number, example in jsonl_records(path, text):
        if not isinstance(example, dict) or not (
            isinstance(example.get("text"), str)
            or (isinstance(example.get("prompt"), str) and isinstance(example.get("completion"), str))
            or isinstance(example.get("messages"), list)
        ):
            raise UsageError(
                f'{path}:{number}: expected {{"text"}}, {{"prompt", "completion"}} or {{"messages"}} with strings'
            )
        examples.append(example)
    if not examples:
        raise UsageError(f"{path} holds no examples")
    return examples


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """One example -> (token ids, loss mask) with the tokenizer's EOS closing plain text and completions."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in example:
        messages = example["messages"]
        ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            # The assistant turn is what rendering it adds after the generation prompt.
            start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
            mask[start:end] = [1] * (end - start)
        return ids, mask
    if "prompt" in example:
        prompt, completion = _ids(tokenizer, example["prompt"]), _ids(tokenizer, example["completion"]) + eos
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    ids = _ids(tokenizer, example["text"]) + eos
    return ids, [1] * len(ids)


def shuffled_indices(seed: int, size: int, start: int, count: int) -> np.ndarray:
    """Items [start, start + count) of an endless sequence of epochs, each a permutation of range(size) drawn from
    (seed, epoch): a run resumed at `start` sees exactly what it would have seen."""
    picked = []
    for position in range(start, start + count):
        epoch, index = divmod(position, size)
        picked.append(np.random.default_rng([seed, epoch]).permutation(size)[index])
    return np.asarray(picked)


def pack_documents(lengths: list[int], seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Rows of whole documents: each row a list of (document, start, stop) pieces whose lengths sum to at most
    `seq_len`. A document longer than a row is cut into seq_len-long pieces (each then a document of its own);
    pieces go longest first into the row they fill best (best-fit decreasing), deterministically."""
    pieces = [(d, start, min(start + seq_len, n)) for d, n in enumerate(lengths) for start in range(0, n, seq_len)]
    pieces.sort(key=lambda p: p[1] - p[2])  # longest first; sort is stable, so ties keep document order
    rows: list[list[tuple[int, int, int]]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for piece in pieces:
        size = piece[2] - piece[1]
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([piece])
            room, row = seq_len - size, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(piece)
            room -= size
        if room:
            bisect.insort(free, (room, row))
    return rows


class Batches:
    """Rows of `seq_len` tokens, batched [grad_accum, batch_size, seq_len]; an epoch is reshuffled by seed.

    pack=True puts several whole documents in a row, each with its own segment id (1, 2, ... along the row; 0 is
    padding): the model attends within a document only and restarts its positions there, so a packed document
    learns exactly what it would alone. pack=False gives each document a row of its own, cut at seq_len.
    """

    def __init__(self, examples: list[dict], tokenizer, seq_len: int, *, pack: bool = True, seed: int = 0):
        if seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
        pad = pad_id(tokenizer)
        encoded = [tokenize(e, tokenizer) for e in examples]
        rows = []
        if pack:
            for pieces in pack_documents([len(ids) for ids, _ in encoded], seq_len):
                ids = np.concatenate([np.asarray(encoded[d][0][a:b], np.int32) for d, a, b in pieces])
                mask = np.concatenate([np.asarray(encoded[d][1][a:b], np.int32) for d, a, b in pieces])
                segments = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), [b - a for _, a, b in pieces])
                rows.append((*self._pad(ids, mask, seq_len, pad), self._padded(segments, seq_len)))
        else:
            rows = [
                self._pad(np.asarray(i[:seq_len], np.int32), np.asarray(m[:seq_len], np.int32), seq_len, pad)
                for i, m in encoded
            ]
        rows = [r for r in rows if self._has_target(r)]  # a row with no target teaches nothing
        if not rows:
            raise UsageError("the data has no tokens to learn from at this --seq-len")
        self.input_ids = np.stack([r[0] for r in rows])
        self.attention_mask = np.stack([r[1] for r in rows])
        self.loss_mask = np.stack([r[2] for r in rows])
        self.segment_ids = np.stack([r[3] for r in rows]) if pack else None
        self.seed = seed

    @staticmethod
    def _has_target(row) -> bool:
        """A token to predict: asked for, and (packed) preceded by a token of its own document."""
        targets = row[2][1:].astype(bool)
        if len(row) > 3:
            targets &= row[3][1:] == row[3][:-1]
        return bool(targets.any())

    @staticmethod
    def _padded(values, seq_len):
        out = np.zeros(seq_len, np.int32)
        out[: len(values)] = values
        return out

    @staticmethod
    def _pad(ids, mask, seq_len, pad):
        n = len(ids)
        out = np.full(seq_len, pad, np.int32), np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
        out[0][:n], out[1][:n], out[2][:n] = ids, 1, mask
        return out

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, start: int, count: int) -> dict:
        """`count` rows starting at global row `start` (row k of epoch e is permutation_e[k])."""
        picked = shuffled_indices(self.seed, len(self), start, count)
        rows = {
            "input_ids": self.input_ids[picked],
            "attention_mask": self.attention_mask[picked],
            "loss_mask": self.loss_mask[picked],
        }
        if self.segment_ids is not None:
            rows["segment_ids"] = self.segment_ids[picked]
        return rows

    def batch(self, position: int, batch_size: int, grad_accum: int) -> dict:
        """The step's batch [grad_accum, batch_size, seq] starting at row `position`."""
        flat = self.rows(position, batch_size * grad_accum)
        return {k: v.reshape(grad_accum, batch_size, -1) for k, v in flat.items()}


def read_pairs(path: str | Path) -> list[dict]:
    """Preference pairs from JSONL: {"prompt", "chosen", "rejected"} as strings, or as lists of chat messages
    ({"prompt": [...], "chosen": [assistant turn], "rejected": [assistant turn]}, or whole "chosen" and "rejected"
    conversations that differ only in their last message)."""
    path, text = read_data_file(path)
    pairs = []
    for number, example in jsonl_records(path, text):
        pair = _pair(example)
        if pair is None:
            raise UsageError(
                f'{path}:{number}: expected {{"prompt", "chosen", "rejected"}} with strings, or chat messages '
                "(a prompt list and chosen/rejected lists, or two conversations differing in their last message)"
            )
        pairs.append(pair)
    if not pairs:
        raise UsageError(f"{path} holds no pairs")
    return pairs


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _pair(example) -> dict | None:
    """The pair in one form: strings, or {"prompt": messages, "chosen": messages, "rejected": messages}."""
    if not isinstance(example, dict):
        return None
    prompt, chosen, rejected = example.get("prompt"), example.get("chosen"), example.get("rejected")
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not (_is_messages(chosen) and _is_messages(rejected)):
        return None
    if prompt is None:  # two whole conversations: the shared turns are the prompt
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
            return None
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not _is_messages(prompt):
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def tokenize_response(prompt, response, tokenizer) -> tuple[list[int], list[int]]:
    """A prompt and its response -> (token ids, loss mask on the response): strings as prompt + completion
    (the response closed by EOS), messages through the chat template (the response after the generation prompt)."""
    if isinstance(prompt, str):
        return tokenize({"prompt": prompt, "completion": response}, tokenizer)
    ids = chat_ids(tokenizer, prompt + response, add_generation_prompt=False)
    start = len(chat_ids(tokenizer, prompt, add_generation_prompt=True))
    if ids[:start] != chat_ids(tokenizer, prompt, add_generation_prompt=True):
        raise UsageError("the chat template renders the prompt differently once a response follows it")
    return ids, [0] * start + [1] * (len(ids) - start)


class PreferencePairs:
    """Pairs as rows of `seq_len` tokens: a step's batch is [grad_accum, 2 * batch_size, seq_len], each micro-batch
    its pairs' chosen sequences then their rejected ones (the layout `train.preference_batch_loss` reads); the
    order is reshuffled each epoch by seed, as `Batches` does."""

    def __init__(self, pairs: list[dict], tokenizer, seq_len: int, *, seed: int = 0):
        if seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
        pad = pad_id(tokenizer)
        sides = {"chosen": [], "rejected": []}
        for number, pair in enumerate(pairs, 1):
            for side, rows in sides.items():
                ids, mask = tokenize_response(pair["prompt"], pair[side], tokenizer)
                row = Batches._pad(
                    np.asarray(ids[:seq_len], np.int32), np.asarray(mask[:seq_len], np.int32), seq_len, pad
                )
                if not row[2][1:].any():
                    raise UsageError(
                        f"pair {number}: no {side} response token fits in --seq-len {seq_len} after its prompt"
                        f" ({len(ids) - sum(mask)} tokens)"
                    )
                rows.append(row)
        self.chosen = [np.stack([r[i] for r in sides["chosen"]]) for i in range(3)]
        self.rejected = [np.stack([r[i] for r in sides["rejected"]]) for i in range(3)]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.chosen[0])

    def rows(self, start: int, count: int) -> dict:
        """Pairs [start, start + count) as [2 * count, seq] rows: their chosen sequences, then their rejected."""
        picked = shuffled_indices(self.seed, len(self), start, count)
        names = ("input_ids", "attention_mask", "loss_mask")
        return {n: np.concatenate([self.chosen[i][picked], self.rejected[i][picked]]) for i, n in enumerate(names)}

    def batch(self, position: int, batch_size: int, grad_accum: int) -> dict:
        """The step's batch [grad_accum, 2 * batch_size, seq] starting at pair `position`."""
        micro = [self.rows(position + a * batch_size, batch_size) for a in range(grad_accum)]
        return {k: np.stack([m[k] for m in micro]) for k in micro[0]}
