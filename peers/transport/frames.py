"""The peer-to-peer protocol, shared by the server and the clients of other peers: paths, the
binary step frame, and the small JSON messages.

A step frame is: 4-byte big-endian length of a JSON header, the header, then the raw bytes of one
tensor (token ids [B, T] int64, or hidden states [B, T, H]) whose dtype and shape the header gives;
hidden states may travel compressed, as the header's `encoding` says (peers/transport/wire.py).
A steps message is a 4-byte count, then each frame behind its 4-byte length; its reply is JSON,
one result (tokens or error) per frame, in order.
"""

import json
import re
import struct
from dataclasses import asdict, dataclass, field

import torch

from inference.sampling import Controls, Sampling, Score
from peers.swarm.checks import finite_number
from peers.swarm.routing import Hop
from peers.swarm.seals import SEAL_CHARS
from peers.transport.logs import valid_request_id
from peers.transport.wire import LOSSLESS, decode_hidden, encode_hidden

PATH_HEALTH = "/health"
PATH_METRICS = "/metrics"  # Prometheus metrics (peers/metrics.py)
PATH_VIEW = "/view"  # what the swarm page (GET /) draws (peers/view.py)
PATH_STEPS = "/swarm/steps"  # several step frames in one message (coalesced for one next peer)
PATH_CLOSE = "/swarm/close"
PATH_TABLE = "/swarm/table"
PATH_RESULTS = "/swarm/results"  # direct return: results (or failures) of steps, to their entry
PATH_PROGRESS = "/swarm/progress"  # how far a step got on this hop (the entry asks when it is late)
STEP_CONTENT_TYPE = "application/x-layerswarm-step"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 20
MAX_VERIFY_CHARS = 64
MAX_SHADOWS = 16  # hops of one route an entry has recomputed
_SEAL = re.compile(f"[A-Za-z0-9_-]{{{SEAL_CHARS}}}")
MAX_DRAFT = 16  # drafted tokens in one step (speculative decoding)
MAX_STEP_ID = 64  # characters
MAX_TOP_LOGPROBS = 20  # alternatives per sampled token (as OpenAI's top_logprobs)
MAX_CONTROL_TOKENS = 1 << 17  # token ids in one row's controls, or in sampling.prompt_tokens


class ProtocolError(ValueError):
    """A frame or message that does not follow the protocol."""


@dataclass(frozen=True)
class ReplyTo:
    """The peer a step's result goes to (direct return)."""

    peer_id: str
    address: str


MAX_COUNT = 1 << 24  # times a token was generated (more than any context holds)
MAX_MASK_CHARS = 1 << 18  # a packed mask (a vocabulary of a million tokens packs far smaller)


@dataclass
class StepRequest:
    session_id: str
    position: int  # index of the first position of `tensor` in the session
    hops: list[Hop]  # this hop first, then the rest of the route
    sampling: Sampling
    tensor: torch.Tensor = field(repr=False)
    prefix: tuple[int, ...] = ()  # hashes of the session's leading token blocks (prefix reuse)
    verify: str = ""  # set: every hop commits to its output (the entry's digest of the tokens so far)
    # one sealed instruction per hop (peers/swarm/seals.py): seal i, opened by hop i alone, names
    # the replica it feeds its output to (its next hop's shadow), or is random bytes (no shadow)
    seals: tuple[str, ...] = ()
    terminal: bool = False  # a shadow's frame: compute this hop, answer its commitment, forward nothing
    draft: int = 0  # the last `draft` tokens are drafted: sample after each of the last draft + 1
    reply_to: "ReplyTo | None" = None  # direct return: the last hop sends the result here, not back
    step_id: str = ""  # with reply_to: the entry's name for this step
    request_id: str = ""  # the OpenAI request it serves (x-request-id): every peer logs with it
    # per sampled row (B of them, or draft + 1 for a drafted step), or none: what the last peer
    # applies to that row's logits besides `sampling` (penalties' counts, banned tokens, a mask)
    controls: tuple[Controls, ...] = ()
    wire: str = (
        LOSSLESS  # how `tensor` travels (peers/transport/wire.py): the sender's forwarder chooses per hop
    )
    score: Score | None = None  # prompt logprobs: the last peer scores the step's positions

    @property
    def sampled(self) -> int:
        """How many last positions of each sequence the last peer reads the logits of (every
        position of a scored step)."""
        return self.tensor.shape[1] if self.score is not None else self.draft + 1


def encode_tensor_frame(
    header: dict, tensor: torch.Tensor, encoding: str = LOSSLESS, sampled: int = 0, start: int | None = None
) -> bytes:
    """A frame of `header` and `tensor` in `encoding` (peers/transport/wire.py; `sampled`: how many last
    positions of each sequence the last peer samples from; `start`: the first one's position)."""
    if tensor.dtype not in _NAMES:
        raise ProtocolError(f"dtype {tensor.dtype} cannot travel; use one of {', '.join(_DTYPES)}")
    fields, payload = encode_hidden(tensor, encoding, sampled, start)
    meta = {**header, "dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), **fields}
    meta = json.dumps(meta).encode()
    return _LEN.pack(len(meta)) + meta + payload


def frame_encoding(frame: bytes) -> str:
    """The encoding a frame this peer encoded names in its header."""
    (n,) = _LEN.unpack_from(frame)
    return json.loads(frame[_LEN.size : _LEN.size + n]).get("encoding", LOSSLESS)


def decode_tensor_frame(body: bytes) -> tuple[dict, torch.Tensor]:
    if len(body) < _LEN.size:
        raise ProtocolError("step frame shorter than its length prefix")
    (n,) = _LEN.unpack_from(body)
    if n > MAX_HEADER_BYTES or _LEN.size + n > len(body):
        raise ProtocolError(f"step frame header length {n} does not fit the {len(body)}-byte body")
    try:
        header = json.loads(bytes(body[_LEN.size : _LEN.size + n]))
        dtype, shape = _DTYPES[header["dtype"]], [int(d) for d in header["shape"]]
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"bad step frame header: {e}") from e
    try:
        tensor = decode_hidden(header, dtype, shape, bytearray(body[_LEN.size + n :]))
    except ValueError as e:
        raise ProtocolError(f"bad step frame: {e}") from e
    return header, tensor


def encode_step(req: StepRequest) -> bytes:
    header = {
        "session_id": req.session_id,
        "position": req.position,
        "hops": [asdict(h) for h in req.hops],
        "sampling": _sampling_json(req.sampling),
        "prefix": list(req.prefix),
    }
    if req.verify:
        header["verify"] = req.verify
    if req.seals:
        header["seals"] = list(req.seals)
    if req.terminal:
        header["terminal"] = True
    if req.draft:
        header["draft"] = req.draft
    if req.reply_to is not None:
        header["reply_to"] = asdict(req.reply_to)
        header["step_id"] = req.step_id
    if req.request_id:
        header["request_id"] = req.request_id
    if req.controls:
        header["controls"] = [_controls_json(c) for c in req.controls]
    if req.score is not None:
        header["score"] = {"targets": list(req.score.targets), "top": req.score.top}
    return encode_tensor_frame(header, req.tensor, req.wire, req.sampled, req.position)


_DEFAULT_SAMPLING = Sampling()


def _sampling_json(s: Sampling) -> dict:
    """The fields that differ from the defaults (a frame stays small)."""
    keep = {"temperature", "top_p", "top_k", "seed"}
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in asdict(s).items()
        if k in keep or v != getattr(_DEFAULT_SAMPLING, k)
    }


def _controls_json(c: Controls) -> dict:
    out = {}
    if c.counts:
        out["counts"] = [list(x) for x in c.counts]
    if c.banned:
        out["banned"] = list(c.banned)
    if c.mask is not None:
        out["mask"] = c.mask
    return out


def decode_step(body: bytes) -> StepRequest:
    header, tensor = decode_tensor_frame(body)
    try:
        req = StepRequest(
            session_id=_typed(header["session_id"], str, "session_id"),
            position=_typed(header["position"], int, "position"),
            hops=[_hop(h) for h in header["hops"]],
            sampling=_sampling(header["sampling"]),
            tensor=tensor,
            prefix=tuple(_typed(x, int, "prefix") for x in header.get("prefix", ())),
            verify=_typed(header.get("verify", ""), str, "verify"),
            seals=tuple(_typed(x, str, "seals") for x in _typed(header.get("seals", []), list, "seals")),
            terminal=_typed(header.get("terminal", False), bool, "terminal", bools=True),
            draft=_typed(header.get("draft", 0), int, "draft"),
            reply_to=_reply_to(header["reply_to"]) if "reply_to" in header else None,
            step_id=_typed(header.get("step_id", ""), str, "step_id"),
            request_id=_typed(header.get("request_id", ""), str, "request_id"),
            controls=tuple(_controls(c) for c in _typed(header.get("controls", []), list, "controls")),
            wire=header.get("encoding", LOSSLESS),  # (checked by decode_tensor_frame)
            score=_score(header["score"]) if "score" in header else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"bad step header: {e}") from e
    if req.position < 0 or not req.hops or tensor.dim() not in (2, 3) or 0 in tensor.shape[:2]:
        raise ProtocolError(
            f"bad step: position {req.position}, {len(req.hops)} hops, tensor of shape {list(tensor.shape)}"
        )
    if len(req.verify) > MAX_VERIFY_CHARS or not req.verify.isprintable():
        raise ProtocolError(f"a step's verify digest is at most {MAX_VERIFY_CHARS} printable characters")
    _check_seals(req)
    if req.draft and not (
        0 < req.draft <= MAX_DRAFT and req.draft < tensor.shape[1] and tensor.shape[0] == 1
    ):
        raise ProtocolError(
            f"a step drafts 1 to {MAX_DRAFT} tokens, fewer than its positions, of one sequence; "
            f"this one drafts {req.draft} of a tensor of shape {list(tensor.shape)}"
        )
    if req.draft and (req.verify or req.position == 0 or req.prefix):
        raise ProtocolError(
            "only a decode step drafts: not a checked one, nor one at position 0 or with a prefix"
        )
    if req.reply_to is not None and (
        not 0 < len(req.step_id) <= MAX_STEP_ID or not req.step_id.isprintable() or req.verify
    ):
        raise ProtocolError(
            f"a step returned directly has a step id of 1 to {MAX_STEP_ID} printable characters, "
            "and is not checked (checked steps return through the route)"
        )
    if req.controls and len(req.controls) != (req.draft + 1 if req.draft else tensor.shape[0]):
        raise ProtocolError(
            f"a step has one row of controls per sampled row or none; this one has {len(req.controls)} "
            f"for a tensor of shape {list(tensor.shape)} drafting {req.draft}"
        )
    _check_score(req)
    if req.request_id and not valid_request_id(req.request_id):
        raise ProtocolError("a step's request_id is 1 to 64 of A-Z a-z 0-9 . _ : -")
    if (tensor.dim() == 2) != (tensor.dtype == torch.int64):
        raise ProtocolError("token ids travel as int64 [B, T] and hidden states as floats [B, T, H]")
    return req


def _check_score(req: StepRequest) -> None:
    positions = req.tensor.shape[1]
    if req.score is not None and (len(req.score.targets) > positions or req.draft or req.prefix):
        raise ProtocolError(
            f"a scored step scores at most its {positions} positions ({len(req.score.targets)} "
            "asked), and drafts nothing and reuses no prefix"
        )


def _check_seals(req: StepRequest) -> None:
    """A shadow's frame (terminal) is checked and carries no seal; a checked step carries one seal
    per hop or none, each of SEAL_CHARS (ProtocolError otherwise)."""
    if req.terminal and not req.verify:
        raise ProtocolError("a shadow's frame (terminal) is a checked step: it carries a verify digest")
    if req.seals and (req.terminal or not req.verify or len(req.seals) != len(req.hops)):
        raise ProtocolError(
            f"a checked step (verify) that is not a shadow's carries one seal per hop or none; this one "
            f"carries {len(req.seals)} for {len(req.hops)} hops{' (terminal)' if req.terminal else ''}"
        )
    if not all(_SEAL.fullmatch(x) for x in req.seals):
        raise ProtocolError(f"a seal is {SEAL_CHARS} characters of unpadded base64url")


def _typed(value, kind: type, name: str, bools: bool = False):
    if not isinstance(value, kind) or (isinstance(value, bool) and not bools):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r:.80}")
    return value


def _hop(h) -> Hop:
    if not isinstance(h, dict):
        raise ValueError(f"a hop must be an object, got {h!r:.80}")
    return Hop(
        _typed(h["peer_id"], str, "peer_id"),
        _typed(h["address"], str, "address"),
        _typed(h["start"], int, "start"),
        _typed(h["end"], int, "end"),
    )


def _reply_to(h) -> ReplyTo:
    if not isinstance(h, dict):
        raise ValueError(f"reply_to must be an object, got {h!r:.80}")
    return ReplyTo(_typed(h["peer_id"], str, "peer_id"), _typed(h["address"], str, "address"))


def _sampling(data: dict) -> Sampling:
    data = dict(_typed(data, dict, "sampling"))
    bias = _typed(data.pop("logit_bias", []), list, "logit_bias")
    if len(bias) > MAX_CONTROL_TOKENS:
        raise ValueError(f"at most {MAX_CONTROL_TOKENS} logit_bias entries")
    data["logit_bias"] = tuple(_pair(x, "logit_bias", float) for x in bias)
    data["prompt_tokens"] = _token_ids(data.get("prompt_tokens", []), "prompt_tokens")
    s = Sampling(**data)
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(s, name)
        if not finite_number(value):
            raise ValueError(f"sampling {name} must be a finite number, got {value!r}")
    for name in ("top_k", "top_logprobs"):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"sampling {name} must be an integer >= 0, got {value!r}")
    if s.seed is not None and (not isinstance(s.seed, int) or isinstance(s.seed, bool)):
        raise ValueError(f"sampling seed must be an integer, got {s.seed!r}")
    if s.top_logprobs > MAX_TOP_LOGPROBS:
        raise ValueError(f"sampling top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {s.top_logprobs}")
    s.params()  # the sampler's own range checks
    return s


def _score(data) -> Score:
    data = _typed(data, dict, "score")
    unknown = set(data) - {"targets", "top"}
    if unknown:
        raise ValueError(f"unknown score fields {sorted(unknown)}")
    top = _typed(data.get("top", 0), int, "score top")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ValueError(f"score top must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    return Score(_token_ids(data.get("targets", []), "score targets"), top)


def _token_ids(value, name: str) -> tuple[int, ...]:
    ids = _typed(value, list, name)
    if len(ids) > MAX_CONTROL_TOKENS:
        raise ValueError(f"{name} has more than {MAX_CONTROL_TOKENS} token ids")
    out = tuple(_typed(x, int, name) for x in ids)
    if any(x < 0 for x in out):
        raise ValueError(f"{name} holds a negative token id")
    return out


def _pair(value, name: str, kind: type) -> tuple:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{name} entries are [token, value] pairs, got {value!r:.80}")
    token = _typed(value[0], int, name)
    number = value[1]
    if kind is float and not finite_number(number):
        raise ValueError(f"{name} values must be finite numbers, got {number!r:.80}")
    if kind is int:
        number = _typed(number, int, name)
    if token < 0:
        raise ValueError(f"{name} holds a negative token id")
    return (token, kind(number))


def _controls(data) -> Controls:
    data = _typed(data, dict, "controls")
    unknown = set(data) - {"counts", "banned", "mask"}
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}")
    counts = _typed(data.get("counts", []), list, "counts")
    if len(counts) > MAX_CONTROL_TOKENS:
        raise ValueError(f"counts has more than {MAX_CONTROL_TOKENS} entries")
    mask = data.get("mask")
    if mask is not None and (not isinstance(mask, str) or len(mask) > MAX_MASK_CHARS):
        raise ValueError(f"a mask is a packed string of at most {MAX_MASK_CHARS} characters")
    pairs = tuple(_pair(x, "counts", int) for x in counts)
    if any(not 1 <= n <= MAX_COUNT for _, n in pairs):
        raise ValueError(f"counts are 1 to {MAX_COUNT} times a token")
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError("counts names a token twice")
    return Controls(
        counts=pairs,
        banned=_token_ids(data.get("banned", []), "banned"),
        mask=mask,
    )


MAX_STEPS_PER_MESSAGE = 4096


def encode_steps(reqs: list[StepRequest]) -> bytes:
    return steps_message([encode_step(req) for req in reqs])


def steps_message(frames: list[bytes]) -> bytes:
    """A steps message of encoded step frames."""
    parts = [_LEN.pack(len(frames))]
    for frame in frames:
        parts += [_LEN.pack(len(frame)), frame]
    return b"".join(parts)


def decode_steps(body: bytes) -> list[StepRequest]:
    if len(body) < _LEN.size:
        raise ProtocolError("steps message shorter than its count")
    (count,) = _LEN.unpack_from(body)
    if not 1 <= count <= MAX_STEPS_PER_MESSAGE:
        raise ProtocolError(
            f"a steps message carries 1 to {MAX_STEPS_PER_MESSAGE} frames, this one says {count}"
        )
    view, offset, reqs = memoryview(body), _LEN.size, []
    for _ in range(count):
        if offset + _LEN.size > len(body):
            raise ProtocolError(f"steps message truncated after {len(reqs)} of {count} frames")
        (n,) = _LEN.unpack_from(body, offset)
        offset += _LEN.size
        if offset + n > len(body):
            raise ProtocolError(f"frame {len(reqs)} of the steps message is truncated")
        reqs.append(decode_step(view[offset : offset + n]))
        offset += n
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes after the last frame of the steps message")
    return reqs
