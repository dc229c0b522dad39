"""Errors of the swarm and the one place that maps them to HTTP (OpenAI's error JSON).

SwarmError
├── InvalidRequest     400  the caller's mistake (bad parameter, prompt too long)
├── Forbidden          403  not for this caller (a private swarm's page data, off loopback)
├── ModelNotServed     404  a model this swarm does not serve
├── NotFound           404  something a request names that this peer does not hold (a stored response)
├── Overloaded         429  no room now (request limit, busy or full peers): retry after a while
├── SwarmUnavailable   503  no complete route, or failover gave up
└── HopFailed          502  a peer of the route failed (the entry fails over on it)
"""

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger("layerswarm.api")


UNREACHABLE = "unreachable"  # a claim that a peer did not answer (refused, timed out)
WRONG_ANSWER = "wrong_answer"  # a claim that a peer answered, but wrong (bad reply, bad commitments)
STALLED = "stalled"  # a claim that a peer took the step and gave no answer in time (it may yet be alive)
CLAIM_KINDS = (UNREACHABLE, WRONG_ANSWER, STALLED)


class SwarmError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class InvalidRequest(SwarmError):
    status = 400
    kind = "invalid_request_error"


class Forbidden(SwarmError):
    status = 403
    kind = "permission_error"


class ModelNotServed(SwarmError):
    status = 404
    kind = "invalid_request_error"

    def __init__(self, model: str, served: str):
        super().__init__(
            f"the model {model!r} does not exist here; this swarm serves {served!r}",
            "model",
            "model_not_found",
        )


class NotFound(SwarmError):
    status = 404
    kind = "invalid_request_error"


class Overloaded(SwarmError):
    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


class SwarmUnavailable(SwarmError):
    status = 503
    kind = "service_unavailable"


class HopFailed(SwarmError):
    """A step failed at `peer_id`. `reason`: "failed" (refused, timed out, error status,
    non-finite output: the peer is at fault), "session_lost" (it no longer holds the session),
    "cache_full" or "busy" (it is healthy but has no room now), "too_large" (the request would
    not fit it even when idle), "bad_request" (the sender's
    step did not fit: nobody is at fault), "bad_input" (the hidden states the previous hop sent
    are not finite: its sender turns this into its own failure, so the peer that computed them is
    the one blamed).

    A failure that names another peer than the one reporting it is a claim, not a finding: the
    entry checks it before banning anyone (peers/swarm/reputation.py). Its `claim` says what
    kind: UNREACHABLE (the peer did not answer: a liveness check decides) or WRONG_ANSWER (it
    answered, but not a valid answer: a liveness check proves nothing, corroboration decides)."""

    status = 502
    kind = "hop_failed"
    REASONS = ("failed", "session_lost", "cache_full", "busy", "too_large", "bad_request", "bad_input")

    def __init__(
        self,
        peer_id: str,
        message: str,
        reason: str = "failed",
        *,
        reported_by: str | None = None,
        signature: str = "",
        answered_by: str | None = None,
        claim: str = UNREACHABLE,
    ):
        super().__init__(f"peer {peer_id} failed: {message}")
        assert reason in self.REASONS, reason
        assert claim in CLAIM_KINDS, claim
        self.claim = claim
        self.peer_id, self.reason = peer_id, reason
        self.detail = message  # what went wrong, without whom (`message` names the peer too)
        # who says so (None: this peer saw it itself), with that peer's signature of the report
        # (peers/transport/results.py); the peer whose reply carried it, set by its receiver
        self.reported_by, self.signature, self.answered_by = reported_by, signature, answered_by


def error_response(error: SwarmError) -> JSONResponse:
    headers = {"retry-after": str(error.retry_after_s)} if isinstance(error, Overloaded) else None
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


async def swarm_error_handler(_: Request, error: SwarmError) -> JSONResponse:
    return error_response(error)


async def validation_error_handler(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = (
        f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    )
    if first.get("type") == "extra_forbidden":
        message = (
            f"this server does not implement the parameter {where!r}; remove it (accepted as metadata "
            "only: user, metadata, store, service_tier)"
        )
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
    return error_response(InvalidRequest(message, param=where or None))


async def unexpected_error_handler(_: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=error)
    return error_response(SwarmError(f"internal error: {type(error).__name__}: {error}"))


def install_handlers(app) -> None:
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_exception_handler(SwarmError, swarm_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
