"""Text-generation metrics as pure functions: distinct-n, self-BLEU, and the unbiased pass@k estimator."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over a set of samples (0 when there are none)."""
    grams = [g for sample in samples for g in ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Sequence, references: Sequence[Sequence], max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002): clipped n-gram precisions up to `max_n`, uniform weights, brevity
    penalty against the closest reference length; a zero count is smoothed to 0.1 / total (Chen & Cherry's
    method 1) so one missing 4-gram does not zero the score."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        total = sum(counts.values())
        if total == 0:
            return 0.0
        most = Counter()
        for reference in references:
            for gram, count in Counter(ngrams(reference, n)).items():
                most[gram] = max(most[gram], count)
        clipped = sum(min(count, most[gram]) for gram, count in counts.items())
        log_precision += math.log((clipped or 0.1) / total) / max_n
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision)


def self_bleu(samples: Sequence[Sequence], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al. 2018): each sample's BLEU against the others, averaged; higher = less diverse."""
    if len(samples) < 2:
        return 0.0
    scores = [bleu(s, [r for j, r in enumerate(samples) if j != i], max_n) for i, s in enumerate(samples)]
    return sum(scores) / len(scores)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimator of Chen et al. 2021: 1 - C(n - c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - correct + 1, n + 1))
