"""Seeded, stratified subsets of records: what ``--samples N`` of the ``dyvte`` commands evaluates or calibrates on.

The first N records of a file are rarely a fair sample (files are often sorted by source, type or difficulty), so
``--samples N`` takes N records at random instead, stratified by question type when the records have one: each
``qtype`` keeps its share of the records (proportional allocation; the rounding remainder goes to the types with the
largest fractional quotas, ties to the type seen first). The draw depends only on the records' types, N and the seed,
and the subset keeps the records' original order.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from fractions import Fraction

__all__ = ["allocate", "subset_indices"]


def allocate(sizes: Sequence[int], n: int) -> list[int]:
    """How many of ``n`` draws each group gets, proportional to ``sizes`` (largest-remainder rounding).

    Each group gets ``floor(n * size / total)``; the draws left over go one each to the groups with the largest
    fractional part of ``n * size / total``, ties to the earlier group. Exact arithmetic (fractions), so equal
    quotas tie exactly. With ``n`` below the number of groups, the largest groups get one draw each.

    Args:
        sizes: the size of each group (each >= 1).
        n: the number of draws, ``0 <= n <= sum(sizes)``.

    Returns:
        One count per group, summing to ``n``, none above its group's size.

    Raises:
        ValueError: an empty group, or ``n`` outside ``[0, sum(sizes)]``.
    """
    total = sum(sizes)
    if any(size < 1 for size in sizes):
        raise ValueError(f"every group needs at least one record, got sizes {list(sizes)}")
    if not 0 <= n <= total:
        raise ValueError(f"cannot draw {n} of {total} records")
    quotas = [Fraction(n * size, total) for size in sizes]
    counts = [int(quota) for quota in quotas]  # floor: quotas are >= 0
    left = n - sum(counts)
    order = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - counts[g]), g))
    for g in order[:left]:
        counts[g] += 1
    return counts


def subset_indices(size: int, n: int | None, groups: Sequence[Hashable] | None = None, seed: int = 0) -> list[int]:
    """The indices of a seeded random subset of ``n`` of ``size`` records, stratified by ``groups``, in order.

    Args:
        size: the number of records.
        n: how many to keep; ``None`` or ``n >= size`` keeps every record (``list(range(size))``).
        groups: each record's group (its ``qtype``; ``None`` is a group of its own); ``None``: no stratification,
            a uniform random subset.
        seed: the seed of the draw (the same seed, sizes and groups give the same subset).

    Returns:
        Sorted indices into the records: the subset in the records' original order.

    Raises:
        ValueError: ``n`` or ``seed`` not an int (a bool is refused), ``n < 0``, or ``groups`` of another length
            than ``size``.
    """
    for name, value in (("n", n), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if seed is None:
        raise ValueError("seed must be an int, got None")
    if n is not None and n < 0:
        raise ValueError(f"n must be None or at least 0, got {n}")
    if groups is not None and len(groups) != size:
        raise ValueError(f"groups has {len(groups)} entries for {size} records")
    if n is None or n >= size:
        return list(range(size))
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups if groups is not None else [None] * size):
        members.setdefault(group, []).append(index)
    counts = allocate([len(indices) for indices in members.values()], n)
    rng = random.Random(seed)
    chosen: list[int] = []
    for indices, count in zip(members.values(), counts, strict=True):  # groups in order of first appearance
        chosen += rng.sample(indices, count)
    return sorted(chosen)
