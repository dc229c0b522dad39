"""Sending a step's output on to the next hop, and closing sessions along a route. The HTTP
client is given, not built here, so that several peers can run in one test process over httpx's
in-memory transports."""

import asyncio

import httpx

from .errors import HopFailed
from .protocol import (
    PATH_CLOSE,
    PATH_STEP,
    STEP_CONTENT_TYPE,
    Hop,
    ProtocolError,
    StepRequest,
    StepResult,
    encode_step,
)

ENCODE_IN_THREAD_BYTES = 1 << 20  # frames larger than this are built off the event loop


class Forwarder:
    """Pushes steps to the next hop of their route on behalf of peer `me`.

    A hop's deadline grows with the work it carries: `hop_timeout_s` for queueing and a decode,
    plus `per_token_s` for each position of the step, for each hop still ahead (calls are nested:
    the reply comes back once the rest of the route has run)."""

    def __init__(self, me: str, http: httpx.AsyncClient, hop_timeout_s: float, per_token_s: float):
        self.me, self.http = me, http
        self.hop_timeout_s, self.per_token_s = hop_timeout_s, per_token_s

    def deadline_s(self, req: StepRequest) -> float:
        positions = req.tensor.shape[0] * req.tensor.shape[1]
        return len(req.hops) * (self.hop_timeout_s + positions * self.per_token_s)

    async def push(self, req: StepRequest) -> StepResult:
        """Send the step to its next hop; its reply (or which peer failed) comes back."""
        nxt = req.hops[0]
        timeout = self.deadline_s(req)
        if req.tensor.numel() * req.tensor.element_size() > ENCODE_IN_THREAD_BYTES:
            body = await asyncio.to_thread(encode_step, req)
        else:
            body = encode_step(req)
        try:
            r = await self.http.post(
                f"http://{nxt.address}{PATH_STEP}",
                content=body,
                headers={"content-type": STEP_CONTENT_TYPE},
                timeout=timeout,
            )
        except httpx.TimeoutException:
            raise HopFailed(nxt.peer_id, f"no answer within {timeout:.1f} s") from None
        except httpx.HTTPError as e:
            raise HopFailed(nxt.peer_id, f"{type(e).__name__}: {e}") from None
        except ProtocolError as e:
            raise HopFailed(self.me, str(e)) from None
        return parse_step_reply(r, nxt.peer_id)

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


def parse_step_reply(r: httpx.Response, peer_id: str) -> StepResult:
    try:
        data = r.json()
    except ValueError:
        raise HopFailed(peer_id, f"status {r.status_code} with a body that is not JSON") from None
    if r.status_code != 200:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        failed = err.get("failed_peer") or peer_id
        reason = err.get("type") if err.get("type") in HopFailed.REASONS else "failed"
        message = err.get("message", f"status {r.status_code}").removeprefix(f"peer {failed} failed: ")
        raise HopFailed(str(failed), str(message), reason)
    try:
        return StepResult([int(t) for t in data["tokens"]], [float(x) for x in data["logprobs"]])
    except (KeyError, TypeError, ValueError):
        raise HopFailed(peer_id, "a step reply without tokens") from None
