"""Selection rules shared by the policies: the first ``n`` requests of each group, a token budget granted in order."""

from __future__ import annotations

import numpy as np


def first_per_group(groups: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """A mask choosing, within each group, the first ``limits`` members in the given order.

    ``groups[i]`` is element ``i``'s group and ``limits[i]`` how many of that group may be taken
    (the same for every member of a group). Order within a group is preserved (a stable sort), so
    passing requests in admission order takes the oldest of each stage first.
    """
    count = len(groups)
    if count == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    rank = np.arange(count) - np.repeat(starts, np.diff(np.append(starts, count)))
    mask = np.empty(count, dtype=bool)
    mask[order] = rank < limits[order]
    return mask


def fill_in_order(sizes: np.ndarray, budget: int, *, allow_partial: bool) -> np.ndarray:
    """Token grants from ``budget`` in order: whole sizes while they fit, then (if allowed) one partial grant.

    The grants are a prefix of positive entries followed by zeros (FCFS: nobody jumps the queue).
    """
    grant = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) == 0 or budget <= 0:
        return grant
    cumulative = np.cumsum(sizes)
    whole = int(np.searchsorted(cumulative, budget, side="right"))
    grant[:whole] = sizes[:whole]
    if allow_partial and whole < len(sizes):
        grant[whole] = budget - (cumulative[whole - 1] if whole else 0)
    return grant
