"""Checks a hop cannot see: an entry that checks (--verify-rate) sends every step the same way (the
verify digest, nested return, no drafts, a seal per hop), a hop learns at most whether its next
hop is checked (its own seal names the shadow it feeds), and each hop is drawn on its own; so a
liar honest only when it could be checked lies into a check and is convicted."""

import asyncio
import struct

import httpx

from peers.entry.consensus import verified_generate
from peers.entry.generation import generate
from peers.swarm.seals import SEAL_CHARS
from peers.transport.frames import PATH_STEPS, Sampling, decode_tensor_frame
from tests.peers.swarm.test_commitments import complete, liar_swarm, texts
from tests.peers.test_inprocess import start_swarm, stop_swarm

_LEN = struct.Struct(">I")
PROMPT = list(range(3, 80))  # longer than a prefix block (32 tokens): prefix reuse would apply


def headers_of(body: bytes) -> list[dict]:
    """The headers of the step frames of a steps message."""
    (count,) = _LEN.unpack_from(body)
    offset, out = _LEN.size, []
    for _ in range(count):
        (n,) = _LEN.unpack_from(body, offset)
        out.append(decode_tensor_frame(body[offset + _LEN.size : offset + _LEN.size + n])[0])
        offset += _LEN.size + n
    return out


def recording(net) -> list[tuple[str, dict]]:
    """Every step frame the in-memory network carries from now on: (address it goes to, header)."""
    seen: list[tuple[str, dict]] = []
    handle = net.handle_async_request

    async def record(request: httpx.Request) -> httpx.Response:
        if request.url.path == PATH_STEPS:
            address = f"{request.url.host}:{request.url.port}"
            seen.extend((address, h) for h in headers_of(await request.aread()))
        return await handle(request)

    net.handle_async_request = record
    return seen


# what told a checked step from another before: each is the value a checked frame had
MARKS = {
    "verify": lambda h: bool(h.get("verify")),
    "nested": lambda h: "reply_to" not in h,
    "no_prefix": lambda h: not h.get("prefix"),
    "no_draft": lambda h: not h.get("draft"),
    "seeded": lambda h: "seed" in h["sampling"] and h["sampling"]["seed"] is not None,
}


def test_a_checked_hops_frames_have_the_shape_of_any_others(tiny_llama):
    """Spans 0:1, 1:2 twice, 2:4 twice, an entry at 0:1 with --verify-rate 1: the frames a hop
    receives for a request whose every hop is shadowed have the same header keys, the same marks
    a checked frame had, and seals of the same number and length, as those of a request with no
    shadow at all (greedy, sampled, and one that may draft); no frame names a shadow."""
    prompts = [PROMPT, [p + 1 for p in PROMPT]]

    async def main():
        settings = {0: {"verify_rate": 1.0, "speculative": True}}
        net, nodes = await start_swarm(tiny_llama, ["0:1", "1:2", "1:2", "2:4", "2:4"], settings=settings)
        entry = nodes[0]
        try:
            seen, frames = recording(net), {}
            for sampling in (Sampling(temperature=0), Sampling(temperature=0.8)):
                gen = verified_generate(entry, prompts[0], 6, sampling, frozenset())
                assert len([s async for s in gen]) == 6
                frames["checked", sampling.temperature], seen[:] = list(seen), []
                async for _ in generate(entry, prompts[1], 6, sampling, frozenset(), speculative=True):
                    pass
                frames["unchecked", sampling.temperature], seen[:] = list(seen), []
            return frames, entry.verification
        finally:
            await stop_swarm(nodes)

    frames, stats = asyncio.run(main())
    assert stats.unchecked_steps == 0, stats  # every checked step had its shadows
    for start in (1, 2):  # and they were fed: 1:2's by the entry, 2:4's by the 1:2 hop its seal told
        assert any(h.get("terminal") and h["hops"][0]["start"] == start for _, h in frames["checked", 0])

    def hop_frames(frames, start):  # frames to hops starting at `start` (not to shadows)
        return [h for _, h in frames if not h.get("terminal") and h["hops"][0]["start"] == start]

    for start in (1, 2):
        for temperature in (0, 0.8):
            a = hop_frames(frames["checked", temperature], start)
            b = hop_frames(frames["unchecked", temperature], start)
            assert a and b
            assert {frozenset(h) for h in a} == {frozenset(h) for h in b}, (start, a[0].keys(), b[0].keys())
            for name, mark in MARKS.items():
                assert {mark(h) for h in a} == {mark(h) for h in b}, (start, temperature, name)
            seals = {(len(h["hops"]), tuple(map(len, h["seals"]))) for h in a + b}
            assert seals == {(len(a[0]["hops"]), (SEAL_CHARS,) * len(a[0]["hops"]))}, seals
    assert not any("shadows" in h for fs in frames.values() for _, h in fs)


# A liar that reads its frames as an attacker who read the source: a mark of a checked frame
# (MARKS above, and a shadow's `terminal`) counts once it has seen frames both with and without it;
# it is honest on a frame that bears a mark that counts, and lies on the others (it adds to the
# hidden states it sends, and commits to what it sends, as a peer serving other weights would).
LIES_WHEN_UNCHECKED = """
import torch
import peers.hop as hop
MARKS = {
    "verify": lambda r: bool(r.verify),
    "shadows": lambda r: bool(getattr(r, "shadows", ())),  # (what frames showed before seals)
    "terminal": lambda r: r.terminal,
    "nested": lambda r: r.reply_to is None,
    "no_prefix": lambda r: not r.prefix,
    "no_draft": lambda r: not r.draft,
    "seeded": lambda r: r.sampling.seed is not None,
}
SEEN = {name: set() for name in MARKS}
def looks_checked(req):
    marks = {name: mark(req) for name, mark in MARKS.items()}
    for name, value in marks.items():
        SEEN[name].add(value)
    return any(value and len(SEEN[name]) == 2 for name, value in marks.items())
_compute = hop.HopRunner.compute
async def compute(self, req, at, block):
    # (and whether it feeds a shadow: its own seal opens to one, so its next hop is checked)
    feeds = bool(getattr(req, "seals", ())) and self.identity.unseal(req.seals[0]) is not None
    checked = looks_checked(req) or feeds
    out, job = await _compute(self, req, at, block)
    if not checked and isinstance(out, torch.Tensor):
        out = out + 0.5
    return out, job
hop.HopRunner.compute = compute
"""


def test_a_liar_honest_only_when_checked_is_caught_at_verify_rate_one_in_five(tiny_llama, make_swarm):
    """An entry 0:1 with --verify-rate 0.2 and --self-referee, the liar and an honest replica of
    1:3, a last peer 3:4; prompts whose routes go through the liar. Up to 50 greedy requests: the
    liar is convicted within them, and every text from its conviction on is the monolithic
    model's. (Where a checked step showed, the liar was never caught: 40 of 50 texts wrong.)"""
    from transformers import AutoTokenizer

    from peers.entry.prefix import routing_key
    from peers.swarm.routing import weight

    args = ["--verify-rate", "0.2", "--self-referee"]
    s, entry, (honest,), liar, last = liar_swarm(make_swarm, tiny_llama, args, LIES_WHEN_UNCHECKED)
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def via_liar(prompt: str) -> bool:  # rendezvous hashing puts the liar on this prompt's route
        key = routing_key(tok.encode(prompt))
        return weight(key, liar.peer_id) > weight(key, honest.peer_id)

    prompts = [p for p in (f"ask {i}: {'pqrs' * (1 + i % 3)}" for i in range(400)) if via_liar(p)][:50]
    assert len(prompts) == 50
    expected = texts(tiny_llama, prompts, 6)
    convicted_at, got = None, []
    for i, prompt in enumerate(prompts):
        got.append(complete(entry, prompt, 6))
        if convicted_at is None and liar.peer_id in entry.health()["verification"]["convicted"]:
            convicted_at = i
    stats = entry.health()["verification"]
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert convicted_at is not None, (stats, wrong)
    assert set(stats["convicted"]) == {liar.peer_id}, stats
    assert all(i < convicted_at for i in wrong), (convicted_at, wrong)


def test_a_liar_that_sees_its_next_hop_checked_is_still_caught(tiny_llama, make_swarm):
    """Spans 0:1 (the entry, --verify-rate 0.2 and --self-referee), 1:2 twice (the liar and an
    honest replica), 2:4 twice: a later hop of the liar's route is replicated, so it is checked
    at the same rate; the liar is honest whenever it feeds a shadow (its seal names one) or its
    frame bears any other mark of a check. Within 50 greedy requests through it, it is convicted,
    and every text from then on is the monolithic model's. (Where a frame named the shadows of
    later hops, every checked request showed the liar one, and it was never caught.)"""
    from transformers import AutoTokenizer

    from peers.entry.prefix import routing_key
    from peers.swarm.routing import weight
    from tests.peers.processes import wait_until

    s = make_swarm(tiny_llama)
    entry = s.add("0:1", args=["--verify-rate", "0.2", "--self-referee"])
    honest = s.add("1:2")
    liar = s.add("1:2", patch=LIES_WHEN_UNCHECKED)
    lasts = [s.add("2:4"), s.add("2:4")]
    s.wait_ready()
    size = len(s.peers)
    serving = lambda p: sum(r["vouched"] and r["status"] == "serving" for r in p.table()["peers"])  # noqa: E731
    wait_until(lambda: all(serving(p) == size for p in (entry, *lasts)), 60, s._why)
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def via_liar(prompt: str) -> bool:
        key = routing_key(tok.encode(prompt))
        return weight(key, liar.peer_id) > weight(key, honest.peer_id)

    prompts = [p for p in (f"tell {i}: {'wxyz' * (1 + i % 3)}" for i in range(400)) if via_liar(p)][:50]
    assert len(prompts) == 50
    expected = texts(tiny_llama, prompts, 6)
    convicted_at, got = None, []
    for i, prompt in enumerate(prompts):
        got.append(complete(entry, prompt, 6))
        if liar.peer_id in entry.health()["verification"]["convicted"]:
            convicted_at = i
            break
    stats = entry.health()["verification"]
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e]
    assert convicted_at is not None, (stats, wrong)
    assert set(stats["convicted"]) == {liar.peer_id}, stats
    after = prompts[convicted_at + 1 : convicted_at + 11]
    assert [complete(entry, p, 6) for p in after] == expected[convicted_at + 1 : convicted_at + 11]
