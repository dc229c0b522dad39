"""Logging: the request id that follows one request through every peer, and the log formats.

The id is the `x-request-id` a client sent (1 to 64 of A-Z a-z 0-9 . _ : -), or a new one; the
entry answers it in the same header, puts it in every step frame of the request, and every peer
that handles a step logs with it. `--log-format json` writes one JSON object per line (time,
level, logger, message, and request_id where there is one)."""

import contextvars
import json
import logging
import re
import time
import uuid

from peers.transport.limits import json_error

REQUEST_ID = contextvars.ContextVar("request_id", default="")
REQUEST_ID_HEADER = "x-request-id"
RUN_KEY = "layerswarm.run"  # where the OpenAI handler leaves its run in the ASGI scope (its tokens)
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(request_tag)s"


def valid_request_id(value: str) -> bool:
    return isinstance(value, str) and _VALID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (`request_id`, and `request_tag` for text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        record.request_id = rid
        record.request_tag = f" [request {rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """The root logger's one handler, in `fmt` (text or json)."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RequestIds:
    """ASGI middleware for the OpenAI door (`/v1/...`): takes the client's x-request-id (a bad
    one is a 400 naming it) or makes one, answers it in the same header, keeps it in REQUEST_ID
    while the request runs (the entry puts it in every step frame), and logs one line per
    request at info level: method, path, status, tokens generated, duration."""

    def __init__(self, app, prefix: str = "/v1/"):
        self.app, self.prefix = app, prefix
        self.log = logging.getLogger("layerswarm.requests")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        rid = given.decode("latin-1") if given is not None else new_request_id()
        if not valid_request_id(rid):
            message = f"{REQUEST_ID_HEADER} must be 1 to 64 of A-Z a-z 0-9 . _ : -"
            for part in json_error(400, message, None, close=False, param=REQUEST_ID_HEADER):
                await send(part)
            return
        token = REQUEST_ID.set(rid)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            run = scope.get(RUN_KEY)  # set by the OpenAI handler once it generates
            tokens = getattr(run, "completion_tokens", 0)
            self.log.info(
                "%s %s %d, %d tokens, %.3f s",
                scope["method"],
                scope["path"],
                status[0],
                tokens,
                time.perf_counter() - started,
            )
            REQUEST_ID.reset(token)
