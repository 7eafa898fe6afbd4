"""The Pareto front of a sweep: the trials no other trial beats at no more cost."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(costs: Sequence[float], scores: Sequence[float], maximize: bool = True) -> list[bool]:
    """For each point (cost, score), whether no other point dominates it: costs no more and scores at least
    as well, and is strictly better in one of the two. Equal points are all on the front.

    Sorted sweep, O(n log n): within one cost only the best score can be on the front, and it is
    when it beats the best score of every cheaper point.
    """
    if len(costs) != len(scores):
        raise ValueError(f"pareto_front: {len(costs)} costs but {len(scores)} scores")
    goodness = [s if maximize else -s for s in scores]  # higher is better from here on
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -goodness[i]))
    front = [False] * len(costs)
    best_cheaper = float("-inf")
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and costs[order[end]] == costs[order[start]]:
            end += 1
        group_best = goodness[order[start]]  # the group is sorted best first
        if group_best > best_cheaper:
            for i in order[start:end]:
                front[i] = goodness[i] == group_best
            best_cheaper = group_best
        start = end
    return front
