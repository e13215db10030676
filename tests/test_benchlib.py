"""The benchmark scripts' shared timing: rows report medians, machine limits the best call."""

import time

from benchlib import best_of, median_of


def slowed_by_a_neighbour(durations):
    """fn sleeping each of `durations` in turn: calls a busy machine slowed down, then one it did not."""
    remaining = list(durations)
    return lambda: time.sleep(remaining.pop(0))


def test_a_limit_is_the_best_call_and_a_row_the_median():
    # Sleeps never end early and a loaded worker oversleeps by milliseconds, not the 0.19 s between the two.
    assert best_of(slowed_by_a_neighbour([0.2, 0.2, 0.01]), 3) < 0.1
    assert median_of(slowed_by_a_neighbour([0.2, 0.2, 0.01]), 3) >= 0.2
