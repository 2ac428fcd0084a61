"""Structural rules of a plan: unique ids, known dependencies, no cycles.

Pure functions shared by TaskSpec validation, the planner and the scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol


class _Node(Protocol):
    id: str
    depends_on: Sequence[str]


def dag_problems(items: Sequence[_Node], *, field: str = "work_items",
                 known: Iterable[str] = ()) -> list[str]:
    """Every structural problem of ``items`` as a sentence naming the field.

    ``known`` are ids outside ``items`` that a dependency may name (items of an
    earlier stage that already ran). Runs in O(items + edges).
    """
    problems: list[str] = []
    index: dict[str, int] = {}
    for pos, item in enumerate(items):
        if item.id in index:
            problems.append(
                f"{field}[{pos}].id: duplicate id {item.id!r} "
                f"(also {field}[{index[item.id]}])"
            )
        else:
            index[item.id] = pos
    outside = set(known)
    for pos, item in enumerate(items):
        for dep in item.depends_on:
            if dep == item.id:
                problems.append(f"{field}[{pos}].depends_on: {item.id!r} depends on itself")
            elif dep not in index and dep not in outside:
                problems.append(
                    f"{field}[{pos}].depends_on: unknown work item {dep!r}"
                )
    if problems:
        return problems
    cycle = find_cycle(items)
    if cycle:
        problems.append(f"{field}: dependency cycle {' -> '.join(cycle)}")
    return problems


def find_cycle(items: Sequence[_Node]) -> list[str]:
    """One dependency cycle as a list of ids (first id repeated at the end), or []."""
    deps = {item.id: [d for d in item.depends_on] for item in items}
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for root in deps:
        if colour[root] != white:
            continue
        # Iterative DFS: plans of 10,000 items must not hit the recursion limit.
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        colour[root] = grey
        path.append(root)
        while stack:
            node, i = stack[-1]
            children = deps.get(node, [])
            if i < len(children):
                stack[-1] = (node, i + 1)
                child = children[i]
                if child not in colour:
                    continue
                if colour[child] == grey:
                    return path[path.index(child):] + [child]
                if colour[child] == white:
                    colour[child] = grey
                    path.append(child)
                    stack.append((child, 0))
            else:
                colour[node] = black
                path.pop()
                stack.pop()
    return []
