"""The steps stream's framing (peers/transport/stream.py), apart from the frames so that checking
a message's signature (peers/transport/auth.py) needs no torch."""

import json
import struct


class StreamFormatError(ValueError):
    """Bytes that are not a steps stream message (or answer)."""


# steps streams (peers/transport/stream.py): a message is id | header length | header (JSON) | body,
# an answer id | status | JSON
MAX_STREAM_HEADER_BYTES = 4096
# what a message carries (its header's "kind"; steps where it names none), and the path its swarm
# signature is made over: a kind changed on the way breaks the signature
PATH_STEPS_STREAM = "/swarm/steps/stream"
SIGNED_PATHS = {"steps": PATH_STEPS_STREAM, "results": PATH_STEPS_STREAM + "/results"}
_STREAM_HEAD = struct.Struct("!QI")
_STREAM_ANSWER = struct.Struct("!QH")


def stream_message(msg_id: int, headers: dict[str, str], body: bytes) -> bytes:
    head = json.dumps(headers, separators=(",", ":")).encode()
    return _STREAM_HEAD.pack(msg_id, len(head)) + head + body


def parse_stream_message(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(id, header, body) of a message; ProtocolError if it is not one."""
    if not isinstance(data, bytes) or len(data) < _STREAM_HEAD.size:
        raise StreamFormatError("a steps stream message is binary and starts with its id and header length")
    msg_id, size = _STREAM_HEAD.unpack_from(data)
    if size > MAX_STREAM_HEADER_BYTES or _STREAM_HEAD.size + size > len(data):
        raise StreamFormatError(
            f"a steps stream message's header has at most {MAX_STREAM_HEADER_BYTES} bytes"
        )
    try:
        headers = json.loads(data[_STREAM_HEAD.size : _STREAM_HEAD.size + size])
    except ValueError:
        raise StreamFormatError("a steps stream message's header is not JSON") from None
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise StreamFormatError("a steps stream message's header maps names to strings")
    return msg_id, headers, data[_STREAM_HEAD.size + size :]


def message_kind(headers: dict[str, str]) -> str:
    """What a message carries: a key of SIGNED_PATHS (StreamFormatError for another)."""
    kind = headers.get("kind", "steps")
    if kind not in SIGNED_PATHS:
        raise StreamFormatError(f"a steps stream message carries one of {sorted(SIGNED_PATHS)}, not {kind!r}")
    return kind


def stream_answer(msg_id: int, status: int, reply: dict) -> bytes:
    return _STREAM_ANSWER.pack(msg_id, status) + json.dumps(reply).encode()


def parse_stream_answer(data: bytes) -> tuple[int, int, bytes]:
    if not isinstance(data, bytes) or len(data) < _STREAM_ANSWER.size:
        raise StreamFormatError("a steps stream answer is binary and starts with its id and status")
    msg_id, status = _STREAM_ANSWER.unpack_from(data)
    return msg_id, status, data[_STREAM_ANSWER.size :]
