"""scripts/attack_sybil.py's flood, in process: each message fits what a peer accepts, and every
entry in it is one a peer reads as validly signed (else the benchmark would measure no attack)."""

from peers.swarm.identity import Identity
from peers.swarm.record import MAX_ENTRIES_PER_MESSAGE, parse_entries
from scripts.attack_sybil import ENTRIES_PER_MESSAGE, check_signing, sybil_messages, sybil_template


def test_the_flood_is_validly_signed_fresh_each_second_and_within_the_message_cap():
    import json

    pool = [Identity.generate() for _ in range(400)]
    template = sybil_template("smollm2-135m", 30)
    check_signing(template, pool[0])
    rounds = [
        [json.loads(m) for m in sybil_messages(pool, tick, 2 * ENTRIES_PER_MESSAGE // 10, template)]
        for tick in (0, 1)
    ]
    seen = []
    for tick, messages in enumerate(rounds):
        assert all(len(m["entries"]) <= min(ENTRIES_PER_MESSAGE, MAX_ENTRIES_PER_MESSAGE) for m in messages)
        entries = [e for m in messages for e in parse_entries(m["entries"])]
        assert len(entries) == 200 and all(e.verify() for e in entries)
        assert {e.heartbeat for e in entries} == {tick + 1}
        assert {(e.start, e.end, e.state) for e in entries} == {(0, 30, "serving")}
        seen.append({e.peer_id for e in entries})
    assert len(seen[0] & seen[1]) == 100  # half re-signed, half new peers
