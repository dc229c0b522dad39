"""Commitments to what a hop computed, and how an entry compares them.

A step frame may ask its hops to commit (its `verify` field: the entry's digest of the tokens the
step continues). Each hop then signs, with its identity, the top-k entries (by magnitude) of its
output at the step's last position: hidden states for inner hops, logits for the last. The
commitments travel back with the step's result, so the entry knows which peer produced what and
can compare two replicas of the same layers on the same input (after TOPLOC: a small commitment
to the largest activations catches other weights, prompts or precisions).

Two honest computations of the same layers are equal up to floating-point noise (batching,
prefill against decode, kernels); the tolerance, relative to the row's largest value, is
calibrated per dtype (tests/peers/swarm/test_commitments.py measures the honest noise against it).
"""

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import xxhash

from inference.sampling import COMMIT_K, top_entries
from peers.swarm.checks import finite_number
from peers.swarm.identity import SIGNATURE_CHARS, Identity, verify

MIN_OVERLAP = COMMIT_K // 2  # top-k indices two honest replicas share at least
MAX_COMMITMENTS = 64  # hops one result may carry
MAX_CONTEXT = 64  # characters of the entry's digest
# |a - b| <= tolerance * max |row|: float32 noise is ~1e-6 of the row's scale, half precision ~1e-3.
# A peer with quantized weights (--quant) commits under its mode: against float32 on the default
# model (10 chat prompts, each of its 3 peers) int8 differs by ~5e-7 (its grids hold the GGUF's),
# int4 by up to 0.04.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2, "int8": 2e-2, "int4": 1e-1}


@dataclass
class VerificationStats:
    """What this entry's checks found (shown on /health)."""

    # requests checked: every request of an entry with --verify-rate (each replicated hop drawn
    # at that rate), and those asked with consensus
    requests: int = 0
    steps: int = 0  # steps of those requests that made tokens
    unchecked_steps: int = 0  # of those steps of shadowed requests, the ones no shadow recomputed
    disagreements: int = 0  # steps the routes computed differently
    unverifiable: int = 0  # requests to check that had no other replica of any hop
    convicted: dict = field(default_factory=dict)  # peer -> why (the latest 64)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Commitment:
    """A hop's signed commitment to its output for one step."""

    peer_id: str
    start: int
    end: int
    position: int  # positions known after the step (the committed row is the one before)
    context: str  # the entry's digest of the tokens the step continues
    dtype: str  # the hop's compute dtype, or its weights' quantization: the tolerance to compare with
    indices: tuple[tuple[int, ...], ...]  # [B][k] of its output
    values: tuple[tuple[float, ...], ...]  # [B][k]
    input_digest: str = ""  # of the whole tensor it received (tensor_digest)
    output_digest: str = ""  # of the whole tensor it sent on ("" for logits: they stay here)
    input_top: tuple[tuple[int, ...], ...] = ()  # top_entries of its input's last row: what it was sent
    input_values: tuple[tuple[float, ...], ...] = ()
    signature: str = ""

    def _fields(self) -> dict:
        """Its fields, shallow (every step signs and checks these: no deep copies)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def message(self) -> bytes:
        fields = self._fields()
        del fields["signature"]
        return b"layerswarm-commitment\0" + json.dumps(fields, separators=(",", ":")).encode()

    def signed(self, identity: Identity) -> "Commitment":
        unsigned = replace(self, peer_id=identity.peer_id, signature="")
        return replace(unsigned, signature=identity.sign(unsigned.message()))

    def verify(self, public_key: str) -> bool:
        return verify(public_key, self.signature, self.message())

    def to_json(self) -> dict:
        rows = ("indices", "values", "input_top", "input_values")
        return {**self._fields(), **{name: [list(r) for r in getattr(self, name)] for name in rows}}

    @classmethod
    def from_json(cls, data) -> "Commitment":
        """A commitment from a step reply, checked field by field (ValueError)."""
        if not isinstance(data, dict) or data.keys() != cls.__dataclass_fields__.keys():
            raise ValueError("a commitment must be an object with exactly the commitment's fields")
        for name in ("peer_id", "context", "dtype", "input_digest", "output_digest"):
            if not isinstance(data[name], str) or len(data[name]) > MAX_CONTEXT:
                raise ValueError(f"commitment {name} must be a string of at most {MAX_CONTEXT} characters")
        if not isinstance(data["signature"], str) or len(data["signature"]) != SIGNATURE_CHARS:
            raise ValueError("commitment signature must be 64 bytes in unpadded base64url")
        for name in ("start", "end", "position"):
            if not isinstance(data[name], int) or isinstance(data[name], bool) or not 0 <= data[name] < 2**31:
                raise ValueError(f"commitment {name} must be a non-negative integer")
        if data["dtype"] not in TOLERANCE:
            raise ValueError(f"commitment dtype must be one of {', '.join(TOLERANCE)}")
        indices, values = _rows(data["indices"], data["values"], "")
        input_top, input_values = _rows(data["input_top"], data["input_values"], "input ")
        return cls(
            data["peer_id"],
            data["start"],
            data["end"],
            data["position"],
            data["context"],
            data["dtype"],
            indices,
            values,
            data["input_digest"],
            data["output_digest"],
            input_top,
            input_values,
            data["signature"],
        )


def _rows(indices, values, what: str) -> tuple[tuple, tuple]:
    """Committed rows (ValueError unless 1 to 64 rows of at most 64 index/value pairs)."""
    if not isinstance(indices, list) or not isinstance(values, list) or len(indices) != len(values):
        raise ValueError(f"committed {what}indices and values must be lists of as many rows")
    if not 0 < len(indices) <= 64:
        raise ValueError(f"committed {what}indices and values have 1 to 64 rows")
    out_i, out_v = [], []
    for idx, val in zip(indices, values, strict=True):
        if not isinstance(idx, list) or not isinstance(val, list) or len(idx) != len(val) or len(idx) > 64:
            raise ValueError(f"each committed {what}row has as many indices as values, at most 64")
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in idx):
            raise ValueError(f"committed {what}indices must be non-negative integers")
        if not all(finite_number(v) for v in val):
            raise ValueError(f"committed {what}values must be finite numbers")
        out_i.append(tuple(idx))
        out_v.append(tuple(float(v) for v in val))
    return tuple(out_i), tuple(out_v)


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a whole tensor as it travels (dtype, shape and bytes)."""
    t = t.detach().contiguous().cpu()
    h = xxhash.xxh3_128(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def input_rows(t: torch.Tensor) -> torch.Tensor:
    """The last position of a step's input: [B, H] hidden states, or [B, 1] token ids."""
    return t[:, -1].float() if t.dim() == 3 else t[:, -1:].float()


def agree(a: Commitment, b: Commitment) -> bool:
    """Whether two commitments to the same layers' output on the same input are equal up to the
    floating-point noise of the looser dtype."""
    if len(a.indices) != len(b.indices):
        return False
    tol = max(TOLERANCE[a.dtype], TOLERANCE[b.dtype])
    for ia, va, ib, vb in zip(a.indices, a.values, b.indices, b.values, strict=True):
        xa, xb = dict(zip(ia, va, strict=True)), dict(zip(ib, vb, strict=True))
        shared = xa.keys() & xb.keys()
        if len(shared) < min(MIN_OVERLAP, len(xa), len(xb)):
            return False
        scale = max([abs(v) for v in va + vb] + [1e-12])
        if any(abs(xa[i] - xb[i]) > tol * scale for i in shared):
            return False
    return True


def greedy_choice(c: Commitment, tokens: list[int]) -> bool:
    """Whether `tokens` are the argmax of the logits `c` commits to, up to the noise (a near tie
    may be broken either way)."""
    tol = TOLERANCE[c.dtype]
    for idx, val, token in zip(c.indices, c.values, tokens, strict=True):
        row = dict(zip(idx, val, strict=True))
        scale = max([abs(v) for v in val] + [1e-12])
        if token not in row or row[token] < max(val) - tol * scale:
            return False
    return True


def distance(a: Commitment, b: Commitment) -> float:
    """The largest difference over shared entries, relative to the rows' scale (for reports and
    for calibrating TOLERANCE); inf if the rows share too few entries."""
    worst = 0.0
    for ia, va, ib, vb in zip(a.indices, a.values, b.indices, b.values, strict=True):
        xa, xb = dict(zip(ia, va, strict=True)), dict(zip(ib, vb, strict=True))
        shared = xa.keys() & xb.keys()
        if len(shared) < min(MIN_OVERLAP, len(xa), len(xb)):
            return math.inf
        scale = max([abs(v) for v in va + vb] + [1e-12])
        worst = max([worst] + [abs(xa[i] - xb[i]) / scale for i in shared])
    return worst


def check_commitments(
    table,
    hops,
    commitments,
    req,
    only: int | None = None,
    mine: "Commitment | None" = None,
    unsigned_ok: frozenset[int] = frozenset(),
) -> tuple[int, str] | None:
    """What is wrong with the commitments a step's result carries for `hops`, the route from the
    checker's next hop on (req: the frame the checker sent them): one per hop, for its layers
    and this step, signed by that hop's key, each one's input exactly what the one before it
    sent (the first one's: req's tensor). `only`: check the signatures of the first `only` only
    (a peer on the route checks its next hop; the entry checks all but `unsigned_ok`: those whose
    commitment nothing will rest on, since the hop before checked it). `mine`: the checker's own
    commitment, which says what it sent (else it is computed from req). Returns (i, why): the
    first wrong commitment is the i-th; each hop checks its next one's, so an honest hop i - 1
    would have refused it."""
    if len(commitments) != len(hops):
        return 0, f"its result carries {len(commitments)} commitments for {len(hops)} hops"
    end = req.position + req.tensor.shape[1]
    if mine is not None:
        sent = mine.output_digest, mine.indices, mine.values
    else:
        idx, val = top_entries(input_rows(req.tensor))
        sent = tensor_digest(req.tensor), _as_rows(idx), _as_rows(val)
    for i, (hop, c) in enumerate(zip(hops, commitments, strict=True)):
        if (
            c.peer_id != hop.peer_id
            or (c.start, c.end) != (hop.start, hop.end)
            or c.context != req.verify
            or c.position != end
            or len(c.indices) != req.tensor.shape[0]
        ):
            return (
                i,
                f"the commitment of {hop.peer_id} is not for its layers {hop.start}:{hop.end} of this step",
            )
        if (c.input_digest, c.input_top, c.input_values) != sent:
            return i, f"{hop.peer_id} committed to another input than the one before it committed to sending"
        if (only is None or i < only) and i not in unsigned_ok:
            entry = table.get(hop.peer_id)
            if entry is None or not c.verify(entry.public_key):
                return i, f"the commitment of {hop.peer_id} is not signed by it"
        sent = c.output_digest, c.indices, c.values
    return None


def checked_shadows(table, planned, commitments, shadows) -> tuple:
    """The shadow commitments that hold: of a shadow planned for that hop, on exactly the input
    the hop committed to, signed by the shadow's key."""
    by_span = {(c.start, c.end): c for c in commitments}
    wanted = {(h.start, h.end): h.peer_id for h in planned}
    out = []
    for s in shadows:
        hop = by_span.get((s.start, s.end))
        entry = table.get(s.peer_id)
        if (
            hop is not None
            and wanted.get((s.start, s.end)) == s.peer_id
            and (s.position, s.context, s.input_digest, s.input_top, s.input_values)
            == (hop.position, hop.context, hop.input_digest, hop.input_top, hop.input_values)
            and entry is not None
            and s.verify(entry.public_key)
        ):
            out.append(s)
    return tuple(out)


def _as_rows(rows) -> tuple:
    return tuple(tuple(r) for r in rows)


MAX_ACCUSATIONS = 256  # kept and relayed by one peer
MAX_ACCUSATIONS_PER_MESSAGE = 32
MAX_REASON = 200


@dataclass(frozen=True)
class Accusation:
    """An entry's signed finding that a peer computed wrong, with the evidence: the accused's
    own signed commitment and a witness's for the same step and layer boundary, which disagree
    beyond the noise. Other peers check all three signatures and avoid the accused until `until`."""

    accused: str
    accuser: str
    until: float  # unix time
    reason: str
    evidence: tuple[Commitment, Commitment]  # the accused's, the witness's
    signature: str = ""

    def message(self) -> bytes:
        body = {
            "accused": self.accused,
            "accuser": self.accuser,
            "until": self.until,
            "reason": self.reason,
            "evidence": [c.to_json() for c in self.evidence],
        }
        return b"layerswarm-accusation\0" + json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    def signed(self, identity: Identity) -> "Accusation":
        unsigned = Accusation(self.accused, identity.peer_id, self.until, self.reason, self.evidence)
        return Accusation(**{**unsigned.__dict__, "signature": identity.sign(unsigned.message())})

    def to_json(self) -> dict:
        return {
            "accused": self.accused,
            "accuser": self.accuser,
            "until": self.until,
            "reason": self.reason,
            "evidence": [c.to_json() for c in self.evidence],
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, data) -> "Accusation":
        names = {"accused", "accuser", "until", "reason", "evidence", "signature"}
        if not isinstance(data, dict) or data.keys() != names:
            raise ValueError(f"an accusation has exactly the fields {sorted(names)}")
        for name, most in (("accused", MAX_CONTEXT), ("accuser", MAX_CONTEXT), ("reason", MAX_REASON)):
            if not isinstance(data[name], str) or len(data[name]) > most:
                raise ValueError(f"accusation {name} must be a string of at most {most} characters")
        if not isinstance(data["signature"], str) or len(data["signature"]) != SIGNATURE_CHARS:
            raise ValueError("accusation signature must be 64 bytes in unpadded base64url")
        until = data["until"]
        if not finite_number(until):
            raise ValueError("accusation until must be a finite number")
        evidence = data["evidence"]
        if not isinstance(evidence, list) or len(evidence) != 2:
            raise ValueError("accusation evidence is two commitments")
        first, second = (Commitment.from_json(c) for c in evidence)
        return cls(
            data["accused"], data["accuser"], float(until), data["reason"], (first, second), data["signature"]
        )

    def problem(self, public_key_of) -> str | None:
        """Why this accusation does not hold (None: it does). `public_key_of(peer_id)` is the key
        this peer's table holds, or None."""
        accused, witness = self.evidence
        if accused.peer_id != self.accused or witness.peer_id in (self.accused, self.accuser):
            return "the evidence is not the accused's commitment and another peer's"
        if (accused.context, accused.position, accused.end) != (
            witness.context,
            witness.position,
            witness.end,
        ):
            return "the two commitments are not for the same step and layer boundary"
        if agree(accused, witness):
            return "the two commitments agree"
        for who, what in ((self.accuser, self), (accused.peer_id, accused), (witness.peer_id, witness)):
            key = public_key_of(who)
            if key is None:
                return f"peer {who} is not known here"
            if not what.verify(key):
                return f"the signature of {who} does not verify"
        return None

    def verify(self, public_key: str) -> bool:
        return verify(public_key, self.signature, self.message())


class Accusations:
    """The accusations this peer made or checked: kept until they expire, relayed with gossip;
    each one checked here makes this peer's entry avoid the accused (`convict`).

    Evidence shows that two peers signed disagreeing commitments for the same claimed step, not
    which of them lied, and keys are free: in an open swarm, a key of one's own and an honest
    peer's commitment to an input of one's choosing would frame that peer. So accusations are
    acted on only where every member is trusted (`trusted`: a private swarm, --swarm-key);
    elsewhere they are counted (`ignored`) and not relayed, and each entry's own checks decide."""

    def __init__(self, public_key_of, convict, max_s: float, trusted: bool, clock=time.time):
        self.public_key_of, self.convict, self.max_s, self.trusted = public_key_of, convict, max_s, trusted
        self.clock = clock
        self.ignored = 0  # accusations received and not acted on (an open swarm)
        self._held: dict[tuple[str, str], Accusation] = {}  # (accused, accuser) -> accusation

    def to_json(self) -> dict:
        """The accusations held and those ignored (fields of /health's verification section)."""
        return {"accusations_held": len(self), "accusations_ignored": self.ignored}

    def add(self, accusation: Accusation) -> None:
        now = self.clock()
        for key in [k for k, a in self._held.items() if a.until <= now]:
            del self._held[key]
        key = (accusation.accused, accusation.accuser)
        if key in self._held or len(self._held) >= MAX_ACCUSATIONS:
            return
        self._held[key] = accusation

    def outgoing(self) -> list[dict]:
        if not self.trusted:
            return []
        now = self.clock()
        live = [a for a in self._held.values() if a.until > now]
        return [a.to_json() for a in live[-MAX_ACCUSATIONS_PER_MESSAGE:]]

    def receive(self, items, me: str) -> int:
        """parse() then take()."""
        return self.take(self.parse(items), me)

    @staticmethod
    def parse(items) -> list[Accusation]:
        """Gossiped accusations, checked for form (ValueError if malformed)."""
        if not isinstance(items, list) or len(items) > MAX_ACCUSATIONS_PER_MESSAGE:
            raise ValueError(f"accusations must be a list of at most {MAX_ACCUSATIONS_PER_MESSAGE}")
        return [Accusation.from_json(item) for item in items]

    def take(self, parsed: list[Accusation], me: str) -> int:
        """Act on the accusations that hold; returns how many were new and hold. One that
        cannot be checked here (an unknown peer) is left for a later round."""
        if not self.trusted:
            self.ignored += len(parsed)
            return 0
        now, taken = self.clock(), 0
        for a in parsed:
            if a.until <= now or (a.accused, a.accuser) in self._held or a.accused == me or a.accuser == me:
                continue
            why = a.problem(self.public_key_of)
            if why is not None:
                continue
            self.add(a)
            self.convict(a.accused, min(a.until - now, self.max_s), f"accused by {a.accuser}: {a.reason}")
            taken += 1
        return taken

    def __len__(self) -> int:
        return len(self._held)


async def with_shadow(main, shadow):
    """Await a step and its shadow's: (main's result, the shadow's commitments). If the step
    fails, the shadow is cancelled (its work is for nothing) before the failure is raised."""
    shadow_task = asyncio.ensure_future(shadow)
    try:
        result = await main
    except BaseException:
        shadow_task.cancel()
        await asyncio.gather(shadow_task, return_exceptions=True)
        raise
    return result, await shadow_task
