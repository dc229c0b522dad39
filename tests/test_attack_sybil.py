"""scripts/attack_sybil.py's flood, in process: each message fits what a peer accepts, and every
entry in it is one a peer reads as validly signed (else the benchmark would measure no attack)."""

import json

from peers.swarm.identity import Identity
from peers.swarm.record import MAX_ENTRIES_PER_MESSAGE, parse_entries
from scripts.attack_sybil import ENTRIES_PER_MESSAGE, Sybil, sybil_messages


def test_the_flood_is_validly_signed_fresh_each_second_and_within_the_message_cap():
    pool = [Sybil(Identity.generate(), "smollm2-135m", 30) for _ in range(400)]
    pool[0].check()
    seen = []
    for tick in (0, 1):
        messages = [json.loads(m) for m in sybil_messages(pool, tick, 200)]
        assert all(len(m["entries"]) <= min(ENTRIES_PER_MESSAGE, MAX_ENTRIES_PER_MESSAGE) for m in messages)
        entries = [e for m in messages for e in parse_entries(m["entries"])]
        assert len(entries) == 200 and all(e.verify() for e in entries)
        assert {e.heartbeat for e in entries} == {tick + 1}
        assert {(e.start, e.end, e.state) for e in entries} == {(0, 30, "serving")}
        seen.append({e.peer_id for e in entries})
    assert len(seen[0] & seen[1]) == 100  # half re-signed, half new peers
