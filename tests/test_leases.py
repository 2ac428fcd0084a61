"""The lease book: admits CPU and memory against per-agent and total limits, FIFO, never over."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.resources import LeaseBook, LeaseRefused
from schemas import HivebusError, Lease, LeaseRequest

EPS = 1e-9


def book(*, total_cpu: float = 8, total_memory_mb: int = 16 * 1024, agent_cpu: float = 1,
         agent_memory_mb: int = 1024) -> LeaseBook:
    return LeaseBook(total_cpu=total_cpu, total_memory_mb=total_memory_mb,
                     agent_cpu=agent_cpu, agent_memory_mb=agent_memory_mb)


def ask(agent: str, item: str, *, cpu: float = 0.5, memory_mb: int = 256) -> LeaseRequest:
    return LeaseRequest(agent_id=agent, task_id="t-abc", item_id=item, cpu=cpu, memory_mb=memory_mb)


def assert_within_limits(b: LeaseBook) -> None:
    assert b.allocated_cpu <= b.total_cpu + EPS
    assert b.allocated_memory_mb <= b.total_memory_mb
    agents = {lease.agent_id for lease in b.leases.values()}
    for agent in agents:
        mine = [lease for lease in b.leases.values() if lease.agent_id == agent]
        assert sum(lease.cpu for lease in mine) <= b.agent_cpu + EPS
        assert sum(lease.memory_mb for lease in mine) <= b.agent_memory_mb


def fits(b: LeaseBook, request: LeaseRequest) -> bool:
    """Whether ``request`` would fit now: the test's own reading of the limits."""
    mine = [lease for lease in b.leases.values() if lease.agent_id == request.agent_id]
    return (b.allocated_cpu + request.cpu <= b.total_cpu + EPS
            and b.allocated_memory_mb + request.memory_mb <= b.total_memory_mb
            and sum(lease.cpu for lease in mine) + request.cpu <= b.agent_cpu + EPS
            and sum(lease.memory_mb for lease in mine) + request.memory_mb <= b.agent_memory_mb)


# --- granting ----------------------------------------------------------------------

def test_a_request_under_every_limit_is_granted_at_once():
    b = book()
    lease, waiting = b.request(ask("executor-1", "a"))
    assert waiting is None
    assert isinstance(lease, Lease)
    assert (lease.agent_id, lease.item_id, lease.cpu, lease.memory_mb) == ("executor-1", "a", 0.5, 256)
    assert lease.waited_s == 0.0
    assert b.leases == {lease.lease_id: lease}
    assert (b.allocated_cpu, b.allocated_memory_mb) == (0.5, 256)


def test_every_lease_gets_its_own_id():
    b = book()
    leases = [b.request(ask(f"executor-{i}", "a"))[0] for i in range(5)]
    assert len({lease.lease_id for lease in leases}) == 5


def test_one_agent_may_hold_several_leases_up_to_its_limit():
    b = book(agent_cpu=1, agent_memory_mb=1024)
    first, _ = b.request(ask("executor-1", "a", cpu=0.5, memory_mb=512))
    second, _ = b.request(ask("executor-1", "b", cpu=0.5, memory_mb=512))
    assert first is not None and second is not None
    assert b.allocated_memory_mb == 1024


# --- queueing ----------------------------------------------------------------------

@pytest.mark.parametrize(("held", "asked"), [
    (ask("executor-1", "a", cpu=0.5, memory_mb=800), ask("executor-1", "b", cpu=0.5, memory_mb=300)),
    (ask("executor-1", "a", cpu=0.75, memory_mb=100), ask("executor-1", "b", cpu=0.5, memory_mb=100)),
    (ask("executor-1", "a", cpu=0.5, memory_mb=800), ask("executor-2", "b", cpu=0.5, memory_mb=300)),
    (ask("executor-1", "a", cpu=1, memory_mb=100), ask("executor-2", "b", cpu=1, memory_mb=100)),
], ids=["agent-memory", "agent-cpu", "total-memory", "total-cpu"])
def test_a_request_that_would_exceed_a_limit_waits_in_the_queue(held, asked):
    b = book(total_cpu=1.5, total_memory_mb=1000, agent_cpu=1, agent_memory_mb=1000)
    granted, _ = b.request(held)
    assert granted is not None
    lease, waiting = b.request(asked)
    assert lease is None
    assert waiting is not None and waiting.request == asked and waiting.granted is None
    assert list(b.queue) == [waiting]
    assert list(b.leases) == [granted.lease_id]


def test_with_1024_mb_in_total_two_of_four_512_mb_requests_run_until_a_release():
    b = book(total_memory_mb=1024, agent_memory_mb=1024)
    answers = [b.request(ask(f"executor-{i}", f"item-{i}", memory_mb=512)) for i in range(1, 5)]
    granted = [lease for lease, _ in answers if lease is not None]
    waiting = [w for _, w in answers if w is not None]
    assert [lease.agent_id for lease in granted] == ["executor-1", "executor-2"]
    assert [w.request.agent_id for w in waiting] == ["executor-3", "executor-4"]
    assert b.allocated_memory_mb == 1024

    released, now = b.release(granted[0].lease_id)
    assert released == granted[0]
    assert now == [waiting[0]]
    assert waiting[0].granted is not None and waiting[0].granted.agent_id == "executor-3"
    assert waiting[1].granted is None
    assert b.allocated_memory_mb == 1024


def test_a_large_queued_request_is_not_overtaken_by_a_later_small_one():
    b = book(total_memory_mb=1000, agent_memory_mb=1000)
    held, _ = b.request(ask("executor-1", "held", memory_mb=600))
    _, big = b.request(ask("executor-2", "big", memory_mb=800))
    small_lease, small = b.request(ask("executor-3", "small", memory_mb=100))
    assert small_lease is None, "the small request fits, but the big one asked first"
    assert list(b.queue) == [big, small]

    _, granted = b.release(held.lease_id)
    assert granted == [big, small]
    assert [w.granted.item_id for w in granted] == ["big", "small"]


def test_a_release_grants_the_queued_requests_that_fit_in_order_and_stops_at_the_first_that_does_not():
    b = book(total_memory_mb=1000, agent_memory_mb=1000)
    held, _ = b.request(ask("executor-1", "held", memory_mb=1000))
    queued = [b.request(ask(f"executor-{i}", f"q{i}", memory_mb=m))[1]
              for i, m in [(2, 300), (3, 300), (4, 500), (5, 100)]]
    _, granted = b.release(held.lease_id)
    assert [w.request.item_id for w in granted] == ["q2", "q3"]
    assert list(b.queue) == queued[2:]
    assert all(w.granted is not None and w.granted.lease_id in b.leases for w in granted)


def test_releasing_an_unknown_lease_returns_nothing_and_changes_nothing():
    b = book()
    lease, _ = b.request(ask("executor-1", "a"))
    assert b.release("lease-999") == (None, [])
    assert list(b.leases) == [lease.lease_id]


def test_a_lease_released_twice_is_returned_only_once():
    b = book()
    lease, _ = b.request(ask("executor-1", "a"))
    assert b.release(lease.lease_id)[0] == lease
    assert b.release(lease.lease_id)[0] is None
    assert b.leases == {}


# --- refusal and withdrawal --------------------------------------------------------

@pytest.mark.parametrize(("cpu", "memory_mb"), [(1.5, 256), (0.5, 2048)])
def test_a_request_above_the_per_agent_limit_is_refused_naming_the_item(cpu, memory_mb):
    b = book(agent_cpu=1, agent_memory_mb=1024)
    with pytest.raises(LeaseRefused) as caught:
        b.request(ask("executor-1", "huge-item", cpu=cpu, memory_mb=memory_mb))
    assert isinstance(caught.value, HivebusError)
    assert "'huge-item'" in str(caught.value)
    assert f"{memory_mb} MB" in str(caught.value)
    assert b.leases == {} and not b.queue


def test_a_request_above_the_total_limit_is_refused_because_it_can_never_fit():
    b = book(total_memory_mb=1024, agent_memory_mb=2048)
    with pytest.raises(LeaseRefused, match="'too-big'"):
        b.request(ask("executor-1", "too-big", memory_mb=1500))


def test_a_withdrawn_request_leaves_the_queue_and_is_never_granted():
    b = book(total_memory_mb=1000, agent_memory_mb=1000)
    held, _ = b.request(ask("executor-1", "held", memory_mb=1000))
    _, first = b.request(ask("executor-2", "first", memory_mb=500))
    _, second = b.request(ask("executor-3", "second", memory_mb=500))
    b.withdraw(first)
    assert list(b.queue) == [second]
    _, granted = b.release(held.lease_id)
    assert granted == [second]
    assert first.granted is None


def test_withdrawing_a_request_that_is_no_longer_queued_is_harmless():
    b = book(total_memory_mb=1000, agent_memory_mb=1000)
    held, _ = b.request(ask("executor-1", "held", memory_mb=1000))
    _, waiting = b.request(ask("executor-2", "w", memory_mb=500))
    b.release(held.lease_id)
    b.withdraw(waiting)
    b.withdraw(waiting)
    assert not b.queue
    assert waiting.granted is not None and waiting.granted.lease_id in b.leases


def test_withdrawing_the_head_of_the_queue_grants_the_requests_behind_it_that_fit():
    b = book(total_memory_mb=1000, agent_memory_mb=1000)
    b.request(ask("executor-1", "held", memory_mb=600))
    _, big = b.request(ask("executor-2", "big", memory_mb=800))
    _, small = b.request(ask("executor-3", "small", memory_mb=100))
    b.withdraw(big)
    assert small.granted is not None
    assert small.granted.lease_id in b.leases


# --- never over-committed ------------------------------------------------------------

AGENTS = [f"executor-{i}" for i in range(1, 5)]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.sampled_from(AGENTS),
                  st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.sampled_from([0, 128, 256, 512, 1024])),
        st.tuples(st.just("release"), st.integers(0, 30)),
        st.tuples(st.just("withdraw"), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS)
def test_no_sequence_of_requests_releases_and_withdrawals_over_commits_or_breaks_fifo(ops):
    b = book(total_cpu=2, total_memory_mb=1536, agent_cpu=1, agent_memory_mb=1024)
    granted: list[Lease] = []
    queued: list = []  # the _Waiting entries we expect in the queue, oldest first
    for n, op in enumerate(ops):
        if op[0] == "request":
            _, agent, cpu, memory_mb = op
            anyone_waiting = bool(b.queue)
            lease, waiting = b.request(ask(agent, f"i{n}", cpu=cpu, memory_mb=memory_mb))
            if lease is not None:
                assert not anyone_waiting, "a request overtook a queued one"
                granted.append(lease)
            else:
                queued.append(waiting)
        elif op[0] == "release" and granted:
            lease = granted.pop(op[1] % len(granted))
            released, now = b.release(lease.lease_id)
            assert released == lease
            assert now == queued[:len(now)], "queued requests are granted oldest first"
            del queued[:len(now)]
            for w in now:
                assert w.granted is not None and w.granted.lease_id in b.leases
                granted.append(w.granted)
            if b.queue:
                assert not fits(b, b.queue[0].request), "a release grants the head if it fits"
        elif op[0] == "withdraw" and queued:
            w = queued.pop(op[1] % len(queued))
            now = b.withdraw(w)
            assert now == queued[:len(now)], "withdrawing grants what now fits, oldest first"
            del queued[:len(now)]
            granted += [x.granted for x in now]
            if b.queue:
                assert not fits(b, b.queue[0].request), "a withdrawal grants the head if it fits"
        assert_within_limits(b)
        assert {lease.lease_id for lease in granted} == set(b.leases)
        assert [id(w) for w in b.queue] == [id(w) for w in queued]
