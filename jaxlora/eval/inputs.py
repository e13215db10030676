"""An evaluation's inputs, read and checked before the model loads (a bad file fails fast, on one line)."""

from __future__ import annotations

from pathlib import Path

from jaxlora.data import jsonl_records
from jaxlora.errors import UsageError


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
