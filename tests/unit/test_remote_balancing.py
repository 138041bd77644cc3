"""The remote pool's choice of upstream (no servers: `_pick` reads only the pool's counts)."""

from __future__ import annotations

from backends.remote import RemotePool
from kernel.config import TierSettings


def _pool() -> RemotePool:
    return RemotePool(TierSettings(name="heavy", remote_urls="http://a:1/v1,http://b:2/v1", remote_max_inflight=16))


def test_new_conversations_arriving_together_split_evenly() -> None:
    """8 distinct conversations at once over two upstreams: 4/4. No upstream holds their prefixes
    yet, so affinity has nothing to win (with it, rendezvous hashing alone split them 5/3 or worse)."""
    pool = _pool()
    for i in range(8):
        upstream = pool._pick(f"conversation {i}".encode(), set())
        assert upstream is not None
        upstream.in_flight += 1
    assert sorted(u.in_flight for u in pool.upstreams) == [4, 4]


def test_a_returning_conversation_goes_home_unless_it_is_far_busier() -> None:
    pool = _pool()
    first = pool._pick(b"conversation", set())
    assert first is not None
    pool._settle(b"conversation", first)
    other = next(u for u in pool.upstreams if u is not first)
    first.in_flight = 2  # busier, within the slack: the prefix cache is worth it
    assert pool._pick(b"conversation", set()) is first
    first.in_flight = 3  # far busier: the least busy one takes it
    assert pool._pick(b"conversation", set()) is other


def test_idle_pools_agree_on_a_new_conversation() -> None:
    """Ties go by rendezvous hashing: two fronts (or a restarted one) send a conversation to one upstream."""
    picks = [_pool()._pick(b"shared prefix", set()) for _ in range(3)]
    assert len({u.url for u in picks if u is not None}) == 1
