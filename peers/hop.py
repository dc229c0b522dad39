"""This peer's part of a step: admit it (the checks made before any work), compute it on the
scheduler, commit to it when checked, and hand it on; one path, whether the result comes back
through the route (nested) or goes straight to the entry (direct return)."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import replace

import torch

from inference import Block, CacheFullError, RequestTooLarge, SessionError
from inference.jobs import Busy, Job, NonFinite, Sampled
from inference.kv_cache import LOCAL, Sender
from inference.prefix_cache import BLOCK_TOKENS
from inference.scheduler import Scheduler
from peers.swarm.commitments import (
    TOLERANCE,
    Commitment,
    check_commitments,
    input_rows,
    tensor_digest,
    top_entries,
    with_shadow,
)
from peers.swarm.identity import Identity
from peers.swarm.membership import DEAD, LEAVING, SERVING, Table
from peers.timing import HopTimes
from peers.transport.direct import DONE, FAILED, QUEUED, Progress, Returns
from peers.transport.errors import WRONG_ANSWER, HopFailed
from peers.transport.forwarder import Forwarder
from peers.transport.frames import Hop, ReplyTo, StepRequest
from peers.transport.results import StepResult, attest, failure_body, step_result_body

log = logging.getLogger("layerswarm.peer")

MAX_STEP_BATCH = 64  # sequences in one step (an OpenAI request asks for at most 16)
MAX_SESSION_ID = 128  # characters
# who sent the step this task runs (set per frame by the /swarm/steps handler; this process's
# own steps are LOCAL): the sessions it opens count against that sender's KV share
STEP_SENDER: ContextVar[Sender] = ContextVar("step_sender", default=LOCAL)

# the compute's errors and the reasons a failed hop gives for them (a ValueError: the sender's
# step does not fit these layers)
COMPUTE_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (Busy, "busy"),
    (SessionError, "session_lost"),
    (RequestTooLarge, "too_large"),
    (CacheFullError, "cache_full"),
    (NonFinite, "failed"),
    (ValueError, "bad_request"),
)


class HopRunner:
    """Runs this peer's hop of the steps it is sent. `block()` is the block to compute with now
    (None while loading or moving); `gossip_round()` runs one gossip round with known peers, to
    learn a peer the table does not know yet; `spawn` runs a coroutine in the background."""

    def __init__(
        self,
        *,
        identity: Identity,
        table: Table,
        context_length: int,
        scheduler: Scheduler,
        block: Callable[[], Block | None],
        forwarder: Forwarder,
        returns: Returns,
        progress: Progress,
        hop_times: HopTimes,
        spawn: Callable[[Coroutine], asyncio.Task],
        gossip_round: Callable[[], Awaitable[object]],
    ):
        self.identity, self.table, self.context_length = identity, table, context_length
        self.scheduler, self.block, self.forwarder = scheduler, block, forwarder
        self.returns, self.progress, self.hop_times = returns, progress, hop_times
        self.spawn, self.gossip_round = spawn, gossip_round
        self.steps_served = 0  # hops this peer computed
        self._learning: asyncio.Future | None = None  # a gossip round to learn an unknown peer
        self._learned_at = 0.0

    @property
    def peer_id(self) -> str:
        return self.table.me.peer_id

    # -- the two ways in -------------------------------------------------------------------
    async def run_step(self, req: StepRequest) -> StepResult:
        """Run this peer's hop of the step, then the rest of the route; HopFailed names who failed
        (and who reports it: see report)."""
        try:
            hop, block = await self.admit(req)
            return await self._run(req, hop, block)
        except Exception as e:
            raise self.report(req, e) from None

    async def accept_step(self, req: StepRequest) -> None:
        """Direct return: check the step (HopFailed if this peer refuses it), then compute it and
        hand it on in the background, while the sender goes on; the result, or the failure
        and who is at fault, goes straight to the entry (peers/transport/direct.py)."""
        try:
            await self._accept(req)
        except Exception as e:
            raise self.report(req, e) from None

    def report(self, req: StepRequest, e: Exception) -> HopFailed:
        """A failure of `req` as this peer hands it back: its own, or its next hop's as this peer
        saw it, reported and signed by this peer; a later hop's signed report as it came (a peer
        speaks only for itself: the entry checks a report naming another peer before it bans)."""
        if not isinstance(e, HopFailed):  # a bug here, a torch or CUDA error: this hop failed
            log.error("step failed here", exc_info=e)
            e = HopFailed(self.peer_id, f"{type(e).__name__}: {e}")
        return attest(e, self.identity, req.session_id)

    async def _accept(self, req: StepRequest) -> None:
        entry = req.reply_to
        if not self.knows_entry(entry) and not await self._learn(lambda: self.knows_entry(entry)):
            raise HopFailed(
                self.peer_id, f"the step's entry {entry.peer_id} is not a live peer of its table", "busy"
            )
        t0 = time.perf_counter()
        hop, block = await self.admit(req)
        self.hop_times.add("check", time.perf_counter() - t0)
        self.progress.mark(req.step_id, QUEUED)
        self.spawn(self._carry(req, hop, block))

    async def _carry(self, req: StepRequest, hop: Hop, block: Block) -> None:
        try:
            await self._run(req, hop, block)
            self.progress.mark(req.step_id, DONE)
        except Exception as e:  # (HopFailed names who failed; anything else is a bug here)
            self.progress.mark(req.step_id, FAILED)
            self.reply(req, self.report(req, e))

    # -- the one path ----------------------------------------------------------------------
    async def _run(self, req: StepRequest, hop: Hop, block: Block) -> StepResult | None:
        """Compute an admitted hop, commit to it if the step is checked, and hand it on. Nested:
        the result of the rest of the route, this hop's commitment first. Returned directly
        (req.reply_to): None; the model's last layers send the result to the entry."""
        out, job = await self.compute(req, hop, block)
        self.steps_served += 1
        t0 = time.perf_counter()
        if isinstance(out, StepResult):  # the model's last layers: the tokens
            if req.verify:  # (the top entries of its logits are only for its commitment)
                out = replace(out, top=None, commitments=(self.commit(req, hop, block, out.top, None),))
            if req.reply_to is None:
                return replace(out, tokens=[], logprobs=[]) if req.terminal else out
            self.reply(req, out)
        else:
            mine = self.commit(req, hop, block, top_entries(out[:, -1]), out) if req.verify else None
            if req.terminal:  # a shadow: its commitment is its answer
                return StepResult([], [], commitments=(mine,))
            position = req.position + job.skipped  # the positions restored from the prefix cache stay behind
            nxt = replace(req, hops=req.hops[1:], tensor=out, position=position, seals=req.seals[1:])
            if req.reply_to is None:
                return await self._hand_on(req, nxt, mine)
            await self.forwarder.push(nxt)  # (the next hop's acknowledgement)
        self.hop_times.add("hand_on", time.perf_counter() - t0)
        return None

    async def _hand_on(self, req: StepRequest, nxt: StepRequest, mine: Commitment | None) -> StepResult:
        """Nested: push `nxt` to the next hop (and, checked, the same input to a replica of it,
        which only answers its commitment, if this peer's seal names one); check what comes back
        against this hop's commitment. `nxt` carries the later hops' seals, which only they open."""
        shadow = self._sealed_shadow(req) if req.verify else None
        if shadow is None:
            result = await self.forwarder.push(nxt)
        else:
            result, seen = await with_shadow(self.forwarder.push(nxt), self.run_shadow(nxt, shadow, mine))
            result = replace(result, shadows=(*result.shadows, *seen))
        if mine is None:
            return result
        problem = check_commitments(self.table, req.hops[1:], result.commitments, nxt, only=1, mine=mine)
        if problem:  # what the next hop answered does not say who computed what: it answered wrong
            raise HopFailed(req.hops[1].peer_id, problem[1], claim=WRONG_ANSWER)
        return replace(result, commitments=(mine, *result.commitments))

    def reply(self, req: StepRequest, outcome: StepResult | HopFailed) -> None:
        """Send a step's result or failure to its entry (this peer itself, or by HTTP)."""
        if req.reply_to.peer_id == self.peer_id:
            self.returns.deliver(self.peer_id, req.step_id, outcome)
        elif isinstance(outcome, HopFailed):
            body = failure_body(outcome)
            self.forwarder.send_result(req.reply_to.address, req.step_id, body)
        else:
            self.forwarder.send_result(req.reply_to.address, req.step_id, step_result_body(outcome))

    # -- admit -----------------------------------------------------------------------------
    async def admit(self, req: StepRequest) -> tuple[Hop, Block]:
        """This peer's hop of the step and the block to run it, or HopFailed: the checks made
        before any work (the receiver bounds its own work, whatever the sender asks)."""
        hop, block = req.hops[0], self.block()
        log.log(  # with the request's id (peers/transport/logs.py): a session's first step at info, the rest at debug
            logging.INFO if req.position == 0 else logging.DEBUG,
            "step of session %s: positions %d-%d of %d sequence(s), layers %d:%d",
            req.session_id[:12],
            req.position,
            req.position + req.tensor.shape[1] - 1,
            req.tensor.shape[0],
            hop.start,
            hop.end,
        )
        if block is None or hop.peer_id != self.peer_id:
            raise HopFailed(
                self.peer_id, f"this peer cannot run hop {hop.start}:{hop.end} for {hop.peer_id}", "busy"
            )
        if not block.span.start <= hop.start < hop.end <= block.span.end:
            raise HopFailed(
                self.peer_id, f"layers {hop.start}:{hop.end} are not inside its span {block.span}"
            )
        total = self.table.me.total_layers
        bad = route_problem(req.hops, total, req.terminal) or frame_problem(req, self.context_length)
        if bad:
            raise HopFailed(self.peer_id, bad, "bad_request")
        nxt = req.hops[1] if len(req.hops) > 1 else None
        if nxt is not None and not self.knows(nxt) and not await self._learn(lambda: self.knows(nxt)):
            raise HopFailed(
                self.peer_id,
                f"its next hop {nxt.peer_id} ({nxt.start}:{nxt.end}) is not a serving peer of its table",
                "busy",  # tables may lag a moment: the entry routes around, nobody is banned
            )
        if req.tensor.is_floating_point() and not bool(torch.isfinite(req.tensor).all()):
            raise HopFailed(self.peer_id, "the hidden states it was sent are not finite", "bad_input")
        return hop, block

    def knows(self, hop: Hop) -> bool:
        """Whether a next hop is a peer of this peer's own table, serving (or leaving: it still
        finishes its sessions) this model's layers of the hop: no frame sends hidden states to an
        address its sender made up."""
        if hop.peer_id == self.peer_id:
            return False  # a route visits each peer once (checked above); never a loop back here
        entry, me = self.table.get(hop.peer_id), self.table.me
        return (
            entry is not None
            and entry.address == hop.address
            and self.table.status(hop.peer_id) not in (None, DEAD)
            and entry.model == me.model
            and entry.state in (SERVING, LEAVING)
            and entry.start <= hop.start < hop.end <= entry.end
        )

    def knows_entry(self, entry: ReplyTo) -> bool:
        """Whether a step's entry is this peer, or a live peer of its table at that address."""
        if entry.peer_id == self.peer_id:
            return entry.address == self.table.me.address
        known = self.table.get(entry.peer_id)
        return (
            known is not None
            and known.address == entry.address
            and self.table.status(entry.peer_id) not in (None, DEAD)
        )

    async def _learn(self, knows: Callable[[], bool]) -> bool:
        """A peer this peer does not know yet (tables lag a moment after a peer joins): one extra
        gossip round with peers it already knows, shared by the steps that wait for it and at
        most one a second, then whether `knows()` now. An address that only the frame names is
        never dialled."""
        loop = asyncio.get_running_loop()
        if self._learning is None or (self._learning.done() and loop.time() - self._learned_at > 1.0):
            self._learned_at = loop.time()
            self._learning = asyncio.ensure_future(self.gossip_round())
        await asyncio.shield(self._learning)
        return knows()

    # -- compute and commit ----------------------------------------------------------------
    async def compute(
        self, req: StepRequest, hop: Hop, block: Block
    ) -> tuple[torch.Tensor | StepResult, Job]:
        """Run the hop on the scheduler: hidden states to hand on, or (the model's last layers)
        the sampled tokens; the errors of the compute mapped to HopFailed reasons."""
        last = hop.end == self.table.me.total_layers
        job = Job(
            req.session_id,
            req.tensor,
            req.position,
            (hop.start, hop.end),
            req.sampling if last else None,
            req.prefix,
            block=block,
            commit=bool(req.verify),
            draft=req.draft,
            controls=req.controls if last else (),
            score=req.score if last else None,
            sender=STEP_SENDER.get(),
            # the pipeline's depth: the hops from here on, or as many spans as this one as the model has
            stages=max(len(req.hops), round(self.table.me.total_layers / (hop.end - hop.start))),
        )
        try:
            out = await self.scheduler.run(job)
        except Exception as e:
            reason = next((r for kind, r in COMPUTE_REASONS if isinstance(e, kind)), None)
            if reason is not None:
                raise HopFailed(self.peer_id, str(e), reason) from None
            # a bug, a torch or CUDA error: this hop failed, the entry fails over
            log.warning("step failed here: %s: %s", type(e).__name__, e)
            raise HopFailed(self.peer_id, f"{type(e).__name__}: {e}") from e
        if job.started is not None:
            self.hop_times.add("queue", job.started - job.enqueued)
        self.hop_times.add("compute", job.compute_s)
        if isinstance(out, Sampled):
            start = req.position + job.skipped if req.prefix else None  # (what was restored: cached)
            out = StepResult(
                out.tokens,
                out.logprobs,
                top=out.top,
                alternatives=out.alternatives,
                prompt=out.prompt,
                computed_from=start,
            )
        return out, job

    def commit(self, req: StepRequest, hop: Hop, block: Block, top, sent: torch.Tensor | None) -> Commitment:
        """This peer's signed commitment to its step: what it was sent, and the top entries of
        its output (and the digest of the output it sends on, if any)."""
        end = req.position + req.tensor.shape[1]
        # the looser of its compute dtype's and its quantization's tolerance (int8 weights
        # computing in bfloat16 differ as bfloat16 does)
        dtype = str(block.dtype).removeprefix("torch.")
        if block.quant != "none" and TOLERANCE[block.quant] > TOLERANCE.get(dtype, 0.0):
            dtype = block.quant
        in_idx, in_val = top_entries(input_rows(req.tensor))
        return Commitment(
            "",
            hop.start,
            hop.end,
            end,
            req.verify,
            dtype,
            tuple(map(tuple, top[0])),
            tuple(map(tuple, top[1])),
            input_digest=tensor_digest(req.tensor),
            output_digest=tensor_digest(sent) if sent is not None else "",
            input_top=tuple(map(tuple, in_idx)),
            input_values=tuple(map(tuple, in_val)),
        ).signed(self.identity)

    # -- shadows ---------------------------------------------------------------------------
    def _sealed_shadow(self, req: StepRequest) -> Hop | None:
        """The shadow of the next hop that this peer's seal (the frame's first) names, at its
        address in this peer's table, if that peer serves those layers (no frame makes a peer send
        hidden states to an address of the sender's choosing). A seal this peer cannot open has
        nothing for it: the next hop is not checked through it."""
        said = self.identity.unseal(req.seals[0]) if req.seals and len(req.hops) > 1 else None
        entry = self.table.get(said.decode("ascii", "replace")) if said else None
        if entry is None:
            return None
        nxt = req.hops[1]
        shadow = Hop(entry.peer_id, entry.address, nxt.start, nxt.end)
        return shadow if self.knows(shadow) else None

    async def run_shadow(
        self, req: StepRequest, shadow: Hop, mine: Commitment | None = None
    ) -> tuple[Commitment, ...]:
        """Send `req`'s input for its first hop to `shadow` too (a terminal frame): its checked
        commitment, or nothing if it failed (the entry then sees that hop unchecked). `mine`:
        this peer's commitment to what it sent, if it computed `req`'s input."""
        frame = replace(req, hops=[shadow], seals=(), terminal=True)
        try:
            if shadow.peer_id == self.peer_id:
                result = await self.run_step(frame)
            else:
                result = await self.forwarder.push(frame)
        except HopFailed as e:
            log.info(
                "shadow %s of layers %d:%d failed: %s", shadow.peer_id, shadow.start, shadow.end, e.message
            )
            return ()
        problem = check_commitments(self.table, [shadow], result.commitments, req, mine=mine)
        if problem:  # (its input must be exactly what this peer sent its hop)
            log.info("shadow %s answered no valid commitment: %s", shadow.peer_id, problem[1])
            return ()
        return result.commitments


def frame_problem(req: StepRequest, context_length: int) -> str | None:
    """What makes a frame one this peer refuses before any work (the receiver bounds its own
    work, whatever the sender asks)."""
    batch, steps = req.tensor.shape[:2]
    if batch > MAX_STEP_BATCH:
        return f"a step carries at most {MAX_STEP_BATCH} sequences, this one {batch}"
    if req.position + steps > context_length:
        return (
            f"positions {req.position}..{req.position + steps} pass the model's context of {context_length}"
        )
    if not 0 < len(req.session_id) <= MAX_SESSION_ID or not req.session_id.isprintable():
        return f"a session id is 1 to {MAX_SESSION_ID} printable characters"
    if len(req.prefix) > context_length // BLOCK_TOKENS:
        return f"a prefix of {len(req.prefix)} blocks is longer than the model's context"
    return None


def route_problem(hops: list[Hop], total: int, terminal: bool = False) -> str | None:
    """What is wrong with a route: hops must tile [first start, total) in order, each peer at
    most once; a shadow's frame (terminal) has one hop."""
    if terminal and len(hops) != 1:
        return "a shadow's frame has exactly one hop"
    for a, b in zip(hops, hops[1:], strict=False):
        if a.end != b.start:
            return f"the route skips or repeats layers: {a.start}:{a.end} is followed by {b.start}:{b.end}"
    if hops[-1].end != total and not terminal:
        return f"the route ends at layer {hops[-1].end}, not at the model's last layer {total}"
    if any(not 0 <= h.start < h.end for h in hops):
        return "a hop of the route has a bad layer range"
    if len({h.peer_id for h in hops}) != len(hops):
        return "the route visits a peer more than once"
    return None
