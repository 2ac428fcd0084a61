"""The DAG scheduler across batches, without NATS or Ray."""

from __future__ import annotations

import pytest

from orchestrator.scheduler import PlanError, Ready, Scheduler
from schemas import PRIORITY_RANK, HivebusError, WorkItemSpec


def spec(item_id: str, *deps: str) -> WorkItemSpec:
    return WorkItemSpec(id=item_id, run="true", depends_on=list(deps))


def ids(ready: list[Ready]) -> list[str]:
    return [r.item.id for r in ready]


def drain(sched: Scheduler, key, *, batch: int = 64) -> list[str]:
    """Run everything with success, returning the ids in the order they ran."""
    order: list[str] = []
    while taken := sched.take(batch):
        for r in taken:
            order.append(r.item.id)
            sched.finish(r.key, r.item.id, ok=True)
    return order


# --- refusals ----------------------------------------------------------------------

@pytest.mark.parametrize(("items", "problem"), [
    ([spec("a", "b"), spec("b", "a")], "cycle"),
    ([spec("a", "a")], "depends on itself"),
    ([spec("a", "ghost")], "unknown work item 'ghost'"),
    ([spec("a"), spec("a")], "duplicate id 'a'"),
])
def test_a_plan_that_is_not_a_dag_is_refused_with_the_problem_named(items, problem):
    sched = Scheduler()
    with pytest.raises(PlanError) as caught:
        sched.add("k", items)
    assert isinstance(caught.value, HivebusError)
    assert any(problem in p for p in caught.value.problems)
    assert problem in str(caught.value)
    assert "k" not in sched and sched.ready_count == 0


def test_a_key_cannot_be_added_twice():
    sched = Scheduler()
    sched.add("k", [spec("a")])
    with pytest.raises(PlanError, match="already scheduled"):
        sched.add("k", [spec("b")])
    assert sched.outcome("k") == {"a": "ready"}


# --- readiness ---------------------------------------------------------------------

def test_independent_items_are_all_ready_at_once():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b")])
    assert sched.ready_count == 2
    taken = sched.take(10)
    assert ids(taken) == ["a", "b"]
    assert sched.running_count == 2 and sched.ready_count == 0


def test_an_item_is_ready_only_when_all_its_dependencies_succeeded():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b"), spec("c", "a", "b")])
    assert ids(sched.take(10)) == ["a", "b"]
    assert sched.outcome("k") == {"a": "running", "b": "running", "c": "pending"}
    assert sched.finish("k", "a", ok=True) == []
    assert sched.take(10) == []
    sched.finish("k", "b", ok=True)
    [ready] = sched.take(10)
    assert ready == Ready("k", spec("c", "a", "b"), 1)


def test_take_respects_its_limit_and_plan_order():
    sched = Scheduler()
    sched.add("k", [spec(f"i{n}") for n in range(5)])
    assert ids(sched.take(2)) == ["i0", "i1"]
    assert ids(sched.take(0)) == []
    assert ids(sched.take(10)) == ["i2", "i3", "i4"]


def test_take_same_hands_out_items_of_the_best_batch_only():
    sched = Scheduler()
    sched.add("low", [spec(f"l{n}") for n in range(3)], priority=PRIORITY_RANK["low"])
    sched.add("high", [spec(f"h{n}") for n in range(3)], priority=PRIORITY_RANK["high"])
    assert sched.best_key() == "high"
    assert ids(sched.take_same(10)) == ["h0", "h1", "h2"]
    assert sched.best_key() == "low"
    assert ids(sched.take_same(2)) == ["l0", "l1"]
    assert sched.ready_count == 1 and sched.running_count == 5


def test_take_same_skips_the_items_of_a_dropped_batch():
    sched = Scheduler()
    sched.add("gone", [spec("g0"), spec("g1")], priority=PRIORITY_RANK["high"])
    sched.add("kept", [spec("k0")])
    sched.drop("gone")
    assert sched.best_key() == "kept"
    assert ids(sched.take_same(5)) == ["k0"]
    assert sched.best_key() is None and sched.take_same(5) == []


def test_a_repeated_dependency_is_counted_once():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b", "a", "a")])
    sched.take(1)
    sched.finish("k", "a", ok=True)
    assert ids(sched.take(1)) == ["b"]


def test_the_batch_is_done_when_nothing_is_pending_ready_or_running():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b", "a")])
    assert not sched.batch_done("k")
    drain(sched, "k")
    assert sched.batch_done("k")
    assert sched.outcome("k") == {"a": "succeeded", "b": "succeeded"}
    assert (sched.ready_count, sched.running_count) == (0, 0)


def test_an_empty_batch_is_done_at_once():
    sched = Scheduler()
    sched.add("k", [])
    assert sched.batch_done("k")


# --- order across batches ----------------------------------------------------------

def test_higher_priority_batches_are_served_first():
    sched = Scheduler()
    sched.add("low", [spec("l")], priority=PRIORITY_RANK["low"])
    sched.add("normal", [spec("n")])
    sched.add("critical", [spec("c")], priority=PRIORITY_RANK["critical"])
    taken = sched.take(3)
    assert [(r.key, r.priority) for r in taken] == [("critical", 3), ("normal", 1), ("low", 0)]


def test_batches_of_equal_priority_are_served_in_the_order_they_were_added():
    sched = Scheduler()
    sched.add(("t-two", 1), [spec("x"), spec("y")])
    sched.add(("t-one", 1), [spec("a")])
    assert [(r.key, r.item.id) for r in sched.take(3)] == [
        (("t-two", 1), "x"), (("t-two", 1), "y"), (("t-one", 1), "a")]


def test_an_item_released_later_still_keeps_its_batch_ahead_of_later_batches():
    sched = Scheduler()
    sched.add("first", [spec("a"), spec("b", "a")])
    sched.add("second", [spec("x"), spec("y")])
    sched.take(1)
    sched.finish("first", "a", ok=True)
    assert [(r.key, r.item.id) for r in sched.take(2)] == [("first", "b"), ("second", "x")]


# --- failures ----------------------------------------------------------------------

def test_a_failure_skips_its_transitive_dependents_only():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b", "a"), spec("c", "b"), spec("d"), spec("e", "d"),
                    spec("f", "c", "e")])
    assert ids(sched.take(10)) == ["a", "d"]
    assert sched.finish("k", "a", ok=False) == ["b", "c", "f"]
    sched.finish("k", "d", ok=True)
    assert ids(sched.take(10)) == ["e"]
    sched.finish("k", "e", ok=True)
    assert sched.take(10) == []
    assert sched.outcome("k") == {"a": "failed", "b": "skipped", "c": "skipped",
                                  "d": "succeeded", "e": "succeeded", "f": "skipped"}
    assert sched.batch_done("k")


def test_an_item_skipped_by_one_failure_is_not_skipped_again_by_another():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b"), spec("c", "a", "b")])
    sched.take(2)
    assert sched.finish("k", "a", ok=False) == ["c"]
    assert sched.finish("k", "b", ok=False) == []
    assert sched.batch_done("k")


def test_finish_refuses_unknown_batches_items_and_items_that_are_not_running():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b", "a")])
    with pytest.raises(KeyError):
        sched.finish("nope", "a", ok=True)
    with pytest.raises(KeyError):
        sched.finish("k", "ghost", ok=True)
    with pytest.raises(ValueError, match="ready, not running"):
        sched.finish("k", "a", ok=True)
    with pytest.raises(ValueError, match="pending, not running"):
        sched.finish("k", "b", ok=True)
    sched.take(1)
    sched.finish("k", "a", ok=True)
    with pytest.raises(ValueError, match="succeeded, not running"):
        sched.finish("k", "a", ok=True)


# --- recovery and cancellation -----------------------------------------------------

def test_items_already_done_are_not_handed_out_again_and_release_their_dependents():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b", "a"), spec("c", "b"), spec("d")], done=["a", "d"])
    assert sched.outcome("k") == {"a": "succeeded", "b": "ready", "c": "pending",
                                  "d": "succeeded"}
    assert drain(sched, "k") == ["b", "c"]
    assert sched.batch_done("k")


def test_a_dependency_on_a_done_item_outside_the_batch_is_valid():
    sched = Scheduler()
    sched.add("k", [spec("fix", "build")], done=["build"])
    assert ids(sched.take(1)) == ["fix"]
    assert sched.outcome("k") == {"fix": "running"}


def test_a_batch_whose_items_are_all_done_is_done():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b", "a")], done={"a", "b"})
    assert sched.batch_done("k") and sched.ready_count == 0


def test_dropping_a_batch_returns_what_was_running_and_never_hands_out_the_rest():
    sched = Scheduler()
    sched.add("doomed", [spec("a"), spec("b"), spec("c"), spec("d", "a")])
    sched.add("other", [spec("x")])
    assert ids(sched.take(2)) == ["a", "b"]
    assert sched.drop("doomed") == ["a", "b"]
    assert "doomed" not in sched and "other" in sched
    assert (sched.ready_count, sched.running_count) == (1, 0)
    assert sched.finish("doomed", "a", ok=True) == []
    assert [(r.key, r.item.id) for r in sched.take(10)] == [("other", "x")]
    assert sched.drop("never-added") == []


def test_a_key_can_be_scheduled_again_after_it_was_dropped():
    sched = Scheduler()
    sched.add("k", [spec("a"), spec("b")])
    sched.take(1)
    sched.drop("k")
    sched.add("k", [spec("c")])
    assert [(r.key, r.item.id) for r in sched.take(10)] == [("k", "c")]


def test_many_dropped_batches_do_not_leak_into_later_takes():
    sched = Scheduler()
    for n in range(50):
        sched.add(n, [spec(f"i{m}") for m in range(100)])
    for n in range(49):
        sched.drop(n)
    assert sched.ready_count == 100
    taken = sched.take(1000)
    assert len(taken) == 100 and {r.key for r in taken} == {49}
    assert sched.take(10) == []


# --- size --------------------------------------------------------------------------

def test_a_ten_thousand_item_chain_drains_in_order():
    n = 10_000
    sched = Scheduler()
    sched.add("chain", [spec("n0")] + [spec(f"n{i}", f"n{i - 1}") for i in range(1, n)])
    assert sched.ready_count == 1
    assert drain(sched, "chain") == [f"n{i}" for i in range(n)]
    assert sched.batch_done("chain")


def test_a_ten_thousand_item_fan_out_is_ready_at_once_after_its_root():
    n = 10_000
    sched = Scheduler()
    sched.add("fan", [spec("root")] + [spec(f"leaf{i}", "root") for i in range(n)]
              + [spec("join", *(f"leaf{i}" for i in range(n)))])
    [root] = sched.take(10)
    sched.finish("fan", root.item.id, ok=True)
    assert sched.ready_count == n
    leaves = sched.take(2 * n)
    assert ids(leaves) == [f"leaf{i}" for i in range(n)]
    for r in leaves:
        sched.finish("fan", r.item.id, ok=True)
    assert ids(sched.take(10)) == ["join"]


def test_a_failure_at_the_root_of_a_ten_thousand_item_chain_skips_the_rest():
    n = 10_000
    sched = Scheduler()
    sched.add("chain", [spec("n0")] + [spec(f"n{i}", f"n{i - 1}") for i in range(1, n)])
    sched.take(1)
    skipped = sched.finish("chain", "n0", ok=False)
    assert skipped == [f"n{i}" for i in range(1, n)]
    assert sched.batch_done("chain")
