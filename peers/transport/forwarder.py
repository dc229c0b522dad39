"""Sending steps' outputs on to their next hops (coalesced per next peer), and closing sessions
along a route. The HTTP client is given, not built here, so that several peers can run in one
test process over httpx's in-memory transports."""

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import httpx

from peers.swarm.links import Links
from peers.transport.errors import STALLED, WRONG_ANSWER, HopFailed
from peers.transport.frames import (
    PATH_CLOSE,
    PATH_PROGRESS,
    PATH_RESULTS,
    PATH_STEPS,
    STEP_CONTENT_TYPE,
    Hop,
    ProtocolError,
    StepRequest,
    encode_step,
    frame_encoding,
    steps_message,
)
from peers.transport.limits import ReplyTooLarge, post_capped
from peers.transport.results import StepResult, parse_steps_reply, results_message
from peers.transport.stream import Streams
from peers.transport.wire import LOSSLESS, hop_encoding

log = logging.getLogger("layerswarm.forwarding")

ENCODE_IN_THREAD_BYTES = 1 << 20  # frames larger than this are built off the event loop
SMALL_FRAME_POSITIONS = 32  # an acknowledgement of steps this small times the link
COALESCE_MAX_POSITIONS = 64  # steps up to this long share messages; longer prompts travel alone
ANSWER_TIMEOUT_S = 1.0  # a peer that has not answered a liveness check by then does not answer


class Forwarder:
    """Pushes steps to the next hop of their route on behalf of peer `me`.

    Steps bound for the same peer in the same turn of the event loop (the outputs of one batched
    forward) travel as one message, and their results come back in one reply; a prompt longer
    than COALESCE_MAX_POSITIONS travels alone, so that no decode step waits for a long prefill
    downstream.

    A hop's deadline grows with the work it carries: `hop_timeout_s` for queueing and a decode,
    plus `per_token_s` for each position of the step, for each hop still ahead (calls are nested:
    the reply comes back once the rest of the route has run). A step returned directly
    (peers/transport/direct.py) is answered as soon as the next hop has checked it: `hop_timeout_s` plus
    `per_token_s` per position, for that hop alone.

    Results of steps returned directly travel the same way: those for the same entry in the
    same turn of the event loop go as one message.

    Hidden states travel as `wire` (peers/transport/wire.py) to a next peer whose announced encodings
    (`accepts(peer_id)`, from its gossip entry) include it, else lossless; so do token ids and
    the frames of checked steps, whose commitments are digests of the exact tensors."""

    def __init__(
        self,
        me: str,
        http: httpx.AsyncClient,
        hop_timeout_s: float,
        per_token_s: float,
        links: Links | None = None,
        wire: str = LOSSLESS,
        accepts: Callable[[str], tuple[str, ...]] = lambda peer_id: (LOSSLESS,),
        streams: Streams | None = None,
    ):
        """`links`, if given, learns the round-trip time of each next hop's acknowledgement;
        `streams`, if given, carries steps messages over persistent websockets (the lean hop),
        HTTP where a next peer takes none."""
        self.me, self.http, self.links, self.streams = me, http, links, streams
        self.wire, self.accepts = wire, accepts
        self.hop_timeout_s, self.per_token_s = hop_timeout_s, per_token_s
        self._outbox: dict[tuple[str, bool], list[tuple[StepRequest, asyncio.Future]]] = {}
        self._results: dict[str, list[tuple[str, dict]]] = {}  # entry address -> (step id, body)
        self._sending: set[asyncio.Task] = set()
        self.messages = 0  # step messages sent
        self.frames = 0  # step frames sent in them
        self.hidden_frames: Counter[str] = Counter()  # frames of hidden states sent, by encoding
        self.hidden_bytes: Counter[str] = Counter()  # and their bytes (headers included)

    def to_json(self) -> dict:
        """The step messages sent and the frames in them (a section of /health)."""
        streams = {"streams": self.streams.to_json()} if self.streams is not None else {}
        return {"messages": self.messages, "frames": self.frames, **streams}

    def deadline_s(self, req: StepRequest) -> float:
        """How long the next hop has to answer `req`: to acknowledge it (returned directly: one
        hop's worth of its work, to receive and check it), or for the whole rest of the route."""
        if req.reply_to is not None:
            return self.hop_timeout_s + req.tensor.shape[0] * req.tensor.shape[1] * self.per_token_s
        return self.route_deadline_s(req)

    def route_deadline_s(self, req: StepRequest) -> float:
        """How long the whole rest of the route has for `req`."""
        positions = req.tensor.shape[0] * req.tensor.shape[1]
        return len(req.hops) * (self.hop_timeout_s + positions * self.per_token_s)

    def send_result(self, address: str, step_id: str, body: dict) -> None:
        """Direct return: send a step's result (or failure) body to the entry at `address`."""
        box = self._results.setdefault(address, [])
        if not box:
            asyncio.get_running_loop().call_soon(self._flush_results, address)
        box.append((step_id, body))

    def _flush_results(self, address: str) -> None:
        items = self._results.pop(address, [])
        if items:
            self._start(self._post_results(address, items))

    async def _post_results(self, address: str, items: list[tuple[str, dict]]) -> None:
        body = json.dumps(results_message(self.me, items)).encode()
        for attempt in range(2):  # once more after a moment; then the entry finds out by probing
            try:
                r = None
                if self.streams is not None:  # (over the stream to the entry, where it takes one)
                    r = await self.streams.post(address, body, self.hop_timeout_s, kind="results")
                if r is None:
                    r = await self.http.post(
                        f"http://{address}{PATH_RESULTS}",
                        content=body,
                        headers={"content-type": "application/json"},
                        timeout=self.hop_timeout_s,
                    )
                if r.status_code == 200:
                    return
                log.info("the entry at %s refused %d results: status %d", address, len(items), r.status_code)
            except httpx.HTTPError as e:
                log.info("results to the entry at %s were lost: %s: %s", address, type(e).__name__, e)
            if attempt == 0:
                await asyncio.sleep(0.1)

    def encoding(self, req: StepRequest) -> str:
        """How `req`'s tensor travels to its next hop (see the class's docstring)."""
        hidden = req.tensor.dim() == 3 and not req.verify and not req.terminal
        return hop_encoding(self.wire, self.accepts(req.hops[0].peer_id), hidden)

    async def push(self, req: StepRequest) -> StepResult:
        """Send the step to its next hop; its reply (or which peer failed) comes back."""
        req = replace(req, wire=self.encoding(req))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if req.tensor.shape[1] > COALESCE_MAX_POSITIONS:  # a long prompt travels alone: no
            # decode step must wait for its prefill downstream
            self._start(self._send([(req, future)]))
            return await future
        # steps returned directly are acknowledged at once: never in a message with nested ones
        key = (req.hops[0].address, req.reply_to is not None)
        box = self._outbox.setdefault(key, [])
        if not box:
            loop.call_soon(self._flush, key)  # after the other steps ready in this turn
        box.append((req, future))
        return await future

    def _flush(self, key: tuple[str, bool]) -> None:
        items = self._outbox.pop(key, [])
        if items:
            self._start(self._send(items))

    def _start(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, items: list[tuple[StepRequest, asyncio.Future]]) -> None:
        reqs = [req for req, _ in items]
        nxt = reqs[0].hops[0]
        timeout = max(self.deadline_s(r) for r in reqs)
        try:
            if sum(r.tensor.numel() * r.tensor.element_size() for r in reqs) > ENCODE_IN_THREAD_BYTES:
                frames = await asyncio.to_thread(lambda: [encode_step(r) for r in reqs])
            else:
                frames = [encode_step(r) for r in reqs]
            body = steps_message(frames)
            for r, frame in zip(reqs, frames, strict=True):
                if r.tensor.dim() == 3:
                    encoding = (
                        frame_encoding(frame) if r.wire != LOSSLESS else LOSSLESS
                    )  # (fp16 may fall back)
                    self.hidden_frames[encoding] += 1
                    self.hidden_bytes[encoding] += len(frame)
            self.messages += 1
            self.frames += len(reqs)
            # an acknowledgement of a small frame times the link (of a large one, the upload too)
            timed = self.links is not None and all(q.reply_to for q in reqs)
            timed = timed and sum(q.tensor.shape[1] for q in reqs) <= SMALL_FRAME_POSITIONS
            sent = time.monotonic()
            r = None if self.streams is None else await self.streams.post(nxt.address, body, timeout)
            if r is None:
                r = await post_capped(
                    self.http,
                    f"http://{nxt.address}{PATH_STEPS}",
                    timeout,
                    content=body,
                    headers={"content-type": STEP_CONTENT_TYPE},
                )
            results = parse_steps_reply(r, nxt.peer_id, len(reqs))
            if timed and r.status_code == 200:
                self.links.observe(nxt.peer_id, time.monotonic() - sent)
        except ReplyTooLarge as e:  # (it answered: too much)
            results = [HopFailed(nxt.peer_id, str(e), claim=WRONG_ANSWER)] * len(reqs)
        except httpx.TimeoutException:
            results = [HopFailed(nxt.peer_id, f"no answer within {timeout:.1f} s", claim=STALLED)] * len(reqs)
        except httpx.HTTPError as e:
            results = [HopFailed(nxt.peer_id, f"{type(e).__name__}: {e}")] * len(reqs)
        except ProtocolError as e:
            results = [HopFailed(self.me, str(e))] * len(reqs)
        except Exception as e:  # never leave a caller waiting
            results = [HopFailed(self.me, f"{type(e).__name__}: {e}")] * len(reqs)
        for (_, future), result in zip(items, results, strict=True):
            if future.done():  # its caller gave up (e.g. the client hung up)
                continue
            if isinstance(result, HopFailed) and result.reason == "bad_input":
                # the next peer refused what this peer computed: this peer is the one at fault
                result = HopFailed(self.me, f"its output was refused by {nxt.peer_id}: {result.detail}")
            if isinstance(result, HopFailed):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def answers(self, address: str, timeout_s: float = ANSWER_TIMEOUT_S) -> bool:
        """Whether the peer at `address` answers a cheap request (how far a step it never saw
        got) within `timeout_s`: a refused connection is a no at once."""
        url = f"http://{address}{PATH_PROGRESS}"
        try:
            get = self.http.get(url, params={"step": "liveness"}, timeout=timeout_s)
            r = await asyncio.wait_for(get, timeout_s)  # (in all: a trickled answer is none)
        except (httpx.HTTPError, TimeoutError):
            return False
        return r.status_code == 200

    async def close_remote(self, session_id: str, hops: list[Hop]) -> None:
        """Free the session on the other peers of a route (best effort, bounded)."""

        async def close_one(hop: Hop) -> None:
            try:
                await self.http.post(
                    f"http://{hop.address}{PATH_CLOSE}", json={"session_id": session_id}, timeout=2.0
                )
            except httpx.HTTPError:
                pass  # the peer's idle expiry frees it

        await asyncio.gather(*(close_one(h) for h in hops if h.peer_id != self.me))
