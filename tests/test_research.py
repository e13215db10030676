"""The research API around `forward`: `score` against transformers, and the README's Research snippets, run as
written on the real SmolLM2."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, random_ids

import jaxlora


def torch_scores(model, ids, mask):
    """transformers' log-softmax gathered at each next token, at the positions its generate derives (cumsum - 1)."""
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids_t, attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0)).logits
    logprobs = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids_t[:, 1:, None])[..., 0].numpy()
    return np.where(mask[:, :-1].astype(bool) & mask[:, 1:].astype(bool), logprobs, 0.0)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_score_matches_transformers_left_and_right_padded(tiny, name):
    m = tiny(name)
    model = m.load()
    ids = random_ids((3, 12), model.config.vocab_size, seed=13)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left-padded
    mask[2, 8:] = 0  # right-padded
    ours = np.asarray(jaxlora.score(model.params, model.config, ids, attention_mask=mask))
    assert ours.shape == (3, 11)
    np.testing.assert_allclose(ours, torch_scores(m.torch_model, ids, mask), rtol=0, atol=1e-4)
    assert (ours[1, :5] == 0).all() and (ours[2, 7:] == 0).all() and (ours[0] < 0).all()


def readme_snippets(section: str) -> list[str]:
    """The ```python blocks of one README section (up to the next heading of the same or a higher level)."""
    level = len(section.split()[0])
    blocks, inside, fence, current = [], False, False, []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if fence and current is not None and inside:
                blocks.append("\n".join(current) + "\n")
            fence, current = not fence, [] if line == "```python" else None
            continue
        if fence:
            if current is not None:
                current.append(line)
        elif line == section:
            inside = True
        elif inside and re.match(rf"#{{1,{level}}} ", line):
            break
    return blocks


@pytest.mark.real
def test_readme_research_snippets_run_as_written(smollm2_checkpoint, monkeypatch, tmp_path):
    dst = smollm2_checkpoint
    snippets = readme_snippets("### Research")
    assert len(snippets) >= 6
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "smollm2-135m-instruct").symlink_to(Path(dst).absolute())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:  # in order: later snippets use what earlier ones defined, as a reader's session would
        exec(compile(snippet, "README.md", "exec"), namespace)
