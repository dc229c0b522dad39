"""The sybil must-hold of issue 23 as a benchmark: a 3-peer local swarm under 5,000 freshly signed
sybil entries a second (5 gossip messages of 1,000, each peer) from another loopback host; 100
greedy chats through every peer must all answer 200 with the monolithic model's text, and a newcomer
started during the flood must be vouched for by every peer and serve a chat within 30 s.

    HF_HUB_OFFLINE=1 python scripts/attack_sybil.py [--model smollm2-135m] [--chats 100]
        [--max-tokens 8] [--entries 5000] [--tiny]

`--tiny` runs it on a tiny random 4-layer model instead (a quick check of the script itself).
Prints a table; exits 1 if a must-hold fails.
"""

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from peers.swarm.gossip import PATH_GOSSIP  # noqa: E402
from peers.swarm.identity import Identity  # noqa: E402
from peers.swarm.record import PeerRecord  # noqa: E402
from scripts.swarm_load import prompts_for  # noqa: E402
from tests.peers.processes import Peer, Swarm, wait_until  # noqa: E402

ENTRIES_PER_MESSAGE = 1000  # under the receiver's 1,024: parsed and merged, not refused whole
ATTACKER_HOST = "127.0.0.2"  # where the flood comes from (another host than the peers')
SYBIL_HOST = "127.0.0.3"  # what the sybil entries claim as their address (nobody answers there)
JOIN_DEADLINE_S = 30.0  # the must-hold: a newcomer vouched for and serving within this
START_TIMEOUT_S = 300.0
CHAT_TIMEOUT_S = 300.0
WINDOW_S = 10.0  # how long a peer's CPU use is watched, idle and then under the flood alone
ENTRY_PREFIX = b"layerswarm-entry\0"  # what PeerRecord.signed_message puts before the fields
JSON = {"content-type": "application/json"}


class Sybil:
    """One sybil: a key of its own and its entry as gossip carries it, serving every layer of
    `model` (nobody answers at its address), with the fields its owner's key sets (PeerRecord.signed
    sets them, once)."""

    def __init__(self, identity: Identity, model: str, layers: int):
        record = PeerRecord("", model, layers, 0, layers, "serving", 1, 0, 0, address=f"{SYBIL_HOST}:1")
        self.identity, self.fields = identity, json.loads(json.dumps(record.signed(identity).to_json()))
        del self.fields["signature"], self.fields["dead_for_s"]

    def entry(self, heartbeat: int, address: str) -> dict:
        """Its entry with this heartbeat and address, signed now as PeerRecord.signed signs (without
        its dataclass copies: twice as fast, which lets one process sign 5,000 entries a second)."""
        fields = {**self.fields, "heartbeat": heartbeat, "address": address}
        message = ENTRY_PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return {**fields, "signature": self.identity.sign(message), "dead_for_s": 0.0}

    def check(self) -> None:
        """`entry` must give what PeerRecord.signed gives (else a peer would refuse every entry)."""
        record = PeerRecord.from_json({**self.fields, "signature": "A" * 86, "dead_for_s": 0.0})
        want = json.loads(json.dumps(replace(record, heartbeat=7).signed(self.identity).to_json()))
        got = self.entry(7, self.fields["address"])
        if got != want:
            raise RuntimeError(f"Sybil.entry no longer signs as PeerRecord.signed does:\n{got}\n{want}")


def sybil_messages(pool: list[Sybil], tick: int, entries: int) -> list[bytes]:
    """This second's gossip messages, encoded: `entries` entries of `pool`'s sybils,
    ENTRIES_PER_MESSAGE a message, each signed now with a heartbeat newer than the last (half of the
    window moves on each second: half are new peers, half news of those of the second before)."""
    start = tick * entries // 2
    signed = [
        pool[(start + i) % len(pool)].entry(tick + 1, f"{SYBIL_HOST}:{20000 + i % 40000}")
        for i in range(entries)
    ]
    return [
        json.dumps({"entries": signed[i : i + ENTRIES_PER_MESSAGE], "challenge": "c" * 24}).encode()
        for i in range(0, entries, ENTRIES_PER_MESSAGE)
    ]


async def flood_async(targets, new_targets, stop, delivered, spec: dict) -> dict:
    """Every second until `stop`: sign this second's messages and post each to every target at once;
    `delivered` counts the messages answered 200."""
    pool = [Sybil(Identity.generate(), spec["model"], spec["layers"]) for _ in range(2 * spec["entries"])]
    pool[0].check()
    statuses: Counter = Counter()
    ticks, late, sign_s = 0, 0, 0.0
    transport = httpx.AsyncHTTPTransport(local_address=ATTACKER_HOST)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(transport=transport, timeout=10, limits=limits) as client:

        async def post(address: str, message: bytes) -> None:
            try:
                r = await client.post(f"http://{address}{PATH_GOSSIP}", content=message, headers=JSON)
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            statuses[status] += 1
            if status == 200:
                with delivered.get_lock():
                    delivered.value += 1

        def sign_round(tick: int) -> tuple[list[bytes], float]:  # in a thread, while a round is sent
            began = time.monotonic()
            return sybil_messages(pool, tick, spec["entries"]), time.monotonic() - began

        first = time.monotonic()
        next_round = asyncio.create_task(asyncio.to_thread(sign_round, 0))
        while not stop.is_set():
            began = time.monotonic()
            while not new_targets.empty():
                targets.append(new_targets.get())
            messages, took_s = await next_round
            sign_s += took_s
            next_round = asyncio.create_task(asyncio.to_thread(sign_round, ticks + 1))
            await asyncio.gather(*(post(a, m) for a in list(targets) for m in messages))
            ticks += 1
            spent = time.monotonic() - began
            late += spent > 1.0
            await asyncio.sleep(max(0.0, 1.0 - spent))
        await next_round
    span_s = time.monotonic() - first
    return {"statuses": dict(statuses), "seconds": ticks, "span_s": span_s, "late": late, "sign_s": sign_s}


def flood_process(targets, new_targets, stop, delivered, results, spec: dict) -> None:
    """The attacker's process (its signing and sending never share a core's GIL with the chats)."""
    results.put(asyncio.run(flood_async(list(targets), new_targets, stop, delivered, spec)))


class Flood:
    """The sybil flood in a process of its own: `start`, `new_targets.put` an address, `stop` (its counts)."""

    def __init__(self, targets: list[str], spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.new_targets, self.results = ctx.Queue(), ctx.Queue()
        self.stop_event, self.delivered = ctx.Event(), ctx.Value("i", 0)
        args = (targets, self.new_targets, self.stop_event, self.delivered, self.results, spec)
        self.process = ctx.Process(target=flood_process, args=args, daemon=True)

    def start(self) -> None:
        self.process.start()

    def stop(self) -> dict:
        self.stop_event.set()
        try:
            result = self.results.get(timeout=60)
        finally:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
        return result


def monolithic_texts(model_path: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy chat reply by the monolithic transformers model (what every peer must give)."""
    import torch

    from inference import Tokenizer
    from inference.whole_model import load_whole_model

    tok = Tokenizer(model_path)
    model = load_whole_model(model_path, torch.float32)
    texts = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=sorted(tok.eos_token_ids) or None,
            )
            new = out[0, len(ids) :].tolist()
            texts.append(tok.decode([t for t in new if t not in tok.eos_token_ids]))
    return texts


async def chat(client: httpx.AsyncClient, peer: Peer, model: str, prompt: str, max_tokens: int) -> tuple:
    """(status, text) of one greedy chat completion through `peer`."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    try:
        r = await client.post(f"{peer.url}/v1/chat/completions", json=body)
    except httpx.HTTPError as e:
        return type(e).__name__, None
    if r.status_code != 200:
        return r.status_code, r.text[:200]
    return 200, r.json()["choices"][0]["message"]["content"]


async def chats_through(peers: list[Peer], model: str, prompts, expected, max_tokens: int) -> list[dict]:
    """Every prompt through every peer (one chat at a time per peer, the peers at once): per peer,
    the statuses and how many texts equal the expected ones."""

    async def one_peer(client, peer) -> dict:
        row = {"statuses": Counter(), "equal": 0, "wrong": []}
        for prompt, want in zip(prompts, expected, strict=True):
            status, text = await chat(client, peer, model, prompt, max_tokens)
            row["statuses"][status] += 1
            if status == 200 and text == want:
                row["equal"] += 1
            elif len(row["wrong"]) < 3:
                row["wrong"].append((prompt, status, text, want))
        return row

    async with httpx.AsyncClient(timeout=CHAT_TIMEOUT_S) as client:
        return await asyncio.gather(*(one_peer(client, p) for p in peers))


def vouched_by_all(peers: list[Peer], newcomer: Peer) -> bool:
    return all(
        any(row["peer_id"] == newcomer.peer_id and row["vouched"] for row in p.table()["peers"])
        for p in peers
    )


def join_newcomer(
    swarm: Swarm, honest: list[Peer], layers: str, flood: Flood, probe: tuple, out: dict
) -> None:
    """Start a newcomer during the flood and time (from when it answers /health) until every honest
    peer vouches for it and a chat through it gives the expected text (`probe`: model, prompt, text,
    max_tokens; every answer counted in out["probes"]); given up after 4x the deadline."""
    began, (model, prompt, want, max_tokens) = time.monotonic(), probe
    newcomer, out["probes"] = swarm.add(layers), Counter()
    out["peer"] = newcomer
    try:
        swarm.wait_ready([newcomer], timeout_s=START_TIMEOUT_S)
    except AssertionError:
        out["error"] = f"not up within {START_TIMEOUT_S:.0f} s"
        return
    ready = time.monotonic()
    out["ready_s"] = ready - began
    flood.new_targets.put(newcomer.address)

    async def serves() -> bool:
        if newcomer.table()["gaps"]:
            return False
        async with httpx.AsyncClient(timeout=CHAT_TIMEOUT_S) as client:
            status, text = await chat(client, newcomer, model, prompt, max_tokens)
        out["probes"][status] += 1
        return status == 200 and text == want

    give_up = ready + 4 * JOIN_DEADLINE_S
    try:
        wait_until(lambda: vouched_by_all(honest, newcomer), give_up - time.monotonic(), swarm._why)
        out["vouched_s"] = time.monotonic() - ready
        wait_until(lambda: asyncio.run(serves()), give_up - time.monotonic(), swarm._why, interval_s=0.5)
        out["serves_s"] = time.monotonic() - ready
    except AssertionError as e:
        out["error"] = str(e).splitlines()[0]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has spent (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(peers: list[Peer], window_s: float) -> list[float]:
    """The share of a core each peer used over the next `window_s` seconds."""
    before = [cpu_seconds(p.proc.pid) for p in peers]
    time.sleep(window_s)
    return [(cpu_seconds(p.proc.pid) - b) / window_s for p, b in zip(peers, before, strict=True)]


def table_rows(peers: list[Peer]) -> list[dict]:
    """Per peer: its table's size, how many of those it vouches for, and live peers it declared dead
    (None each where it did not answer)."""
    live = {}
    for p in peers:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):  # /health answers 503 when not ready
            live[p.peer_id] = httpx.get(f"{p.url}/health", timeout=5).json()["incarnation"]
    rows = []
    for peer in peers:
        try:
            table = peer.table()
        except (httpx.HTTPError, ValueError):
            rows.append({"entries": None, "vouched": None, "dead": None})
            continue
        vouched = sum(row["vouched"] for row in table["peers"])
        dead = [d for d in table["declared_dead"] if live.get(d[0]) == d[1]]
        rows.append({"entries": len(table["peers"]), "vouched": vouched, "dead": len(dead)})
    return rows


def start_swarm(model: str, split: list[str], threads: int | None) -> Swarm:
    """The honest peers, each with a complete route (stopped by the caller, whatever happens)."""
    swarm = Swarm(model, Path(tempfile.mkdtemp(prefix="attack-sybil-")), threads=threads)
    for layers in split:
        swarm.add(layers)
    swarm.wait_ready(timeout_s=START_TIMEOUT_S)
    for peer in swarm.peers:
        swarm.wait_route(peer, timeout_s=START_TIMEOUT_S)
    return swarm


def under_flood(swarm: Swarm, args, prompts: list[str], expected: list[str]) -> dict:
    """Flood every peer, then send the chats and start the newcomer at once; what came of it all."""
    honest = list(swarm.peers)
    first = honest[0].table()
    model, layers = first["model"], first["total_layers"]
    spec = {"entries": args.entries, "model": model, "layers": layers}
    flood = Flood([p.address for p in honest], spec)
    idle = cpu_share(honest, WINDOW_S)  # before the flood, for comparison
    cpu0 = [cpu_seconds(p.proc.pid) for p in honest]
    flood.start()
    try:
        per_second = len(honest) * -(-args.entries // ENTRIES_PER_MESSAGE)
        wait_until(lambda: flood.delivered.value >= 3 * per_second, 120, swarm._why)
        flooded = cpu_share(honest, WINDOW_S)  # the flood alone, no chat yet
        joined, probe = {}, (model, prompts[0], expected[0], args.max_tokens)
        newcomer = threading.Thread(
            target=join_newcomer, args=(swarm, honest, args.newcomer, flood, probe, joined), daemon=True
        )
        newcomer.start()
        rows = asyncio.run(chats_through(honest, model, prompts, expected, args.max_tokens))
        newcomer.join(START_TIMEOUT_S + 5 * JOIN_DEADLINE_S)
        peers = honest + ([joined["peer"]] if "peer" in joined else [])
        tables = table_rows(peers)  # while the flood goes on
        cpu = [cpu_seconds(p.proc.pid) - (cpu0[i] if i < len(cpu0) else 0.0) for i, p in enumerate(peers)]
    finally:
        attack = flood.stop()
    return {
        "peers": peers,
        "chats": rows,
        "joined": joined,
        "attack": attack,
        "cpu": cpu,
        "idle": idle,
        "flooded": flooded,
        "tables": tables,
    }


def report(result: dict, args, split: list[str]) -> list[str]:
    """Print the table; the must-holds that failed (none: all held)."""
    peers, chats, joined, attack = result["peers"], result["chats"], result["joined"], result["attack"]
    messages = -(-args.entries // ENTRIES_PER_MESSAGE)
    print(
        f"model {args.model}, peers {' '.join(split)} + newcomer {args.newcomer}, {args.chats} greedy chats "
        f"of {args.max_tokens} tokens through each honest peer"
    )
    print(
        f"flood from {ATTACKER_HOST}: {args.entries} sybil entries a second to each peer ({messages} messages), "
        f"{attack['seconds']} rounds in {attack['span_s']:.0f} s ({attack['late']} took over 1 s; signing a round "
        f"took {attack['sign_s'] / max(1, attack['seconds']):.2f} s); messages answered {attack['statuses']}"
    )
    print(
        f"{'peer':21} {'layers':7} {'chats 200':>10} {'texts equal':>12} {'CPU s':>7} {'idle %':>7} "
        f"{'flood %':>8} {'entries':>8} {'vouched':>8} {'dead':>5}"
    )
    for i, peer in enumerate(peers):
        table, newcomer = result["tables"][i], i >= len(chats)
        ok = chats[i]["statuses"].get(200, 0) if not newcomer else joined["probes"].get(200, 0)
        total = args.chats if not newcomer else sum(joined["probes"].values())
        equal = f"{chats[i]['equal']}/{args.chats}" if not newcomer else "-"
        idle = f"{100 * result['idle'][i]:.1f}" if not newcomer else "-"
        flooded = f"{100 * result['flooded'][i]:.1f}" if not newcomer else "-"
        print(
            f"{peer.address:21} {peer.layers:7} {f'{ok}/{total}':>10} {equal:>12} {result['cpu'][i]:7.1f} "
            f"{idle:>7} {flooded:>8} {table['entries']!s:>8} {table['vouched']!s:>8} {table['dead']!s:>5}"
        )
    print(
        f"(CPU s: from the flood's start to the end of the chats, the newcomer's from its start; idle % and "
        f"flood %: a core's share over {WINDOW_S:.0f} s before the flood and under the flood alone; "
        "entries: its table under the flood; dead: live peers it declared dead)"
    )
    ready = joined.get("ready_s")
    vouched, serves = joined.get("vouched_s"), joined.get("serves_s")
    print(
        f"newcomer: up (answers /health) {ready if ready is None else round(ready, 1)} s after it started; "
        f"vouched for by every peer {vouched if vouched is None else round(vouched, 1)} s and serves a chat "
        f"{serves if serves is None else round(serves, 1)} s after it was up {joined.get('error', '')}"
    )
    for row in chats:
        for prompt, status, text, want in row["wrong"]:
            print(f"  wrong: {prompt[:30]!r}: {status} {str(text)[:120]!r} (monolithic: {want!r})")
    return must_holds(result, args)


def must_holds(result: dict, args) -> list[str]:
    """The must-holds that failed, printed (none: all held)."""
    chats, attack, serves = result["chats"], result["attack"], result["joined"].get("serves_s")
    messages = -(-args.entries // ENTRIES_PER_MESSAGE)
    total = len(chats) * args.chats
    ok, equal = sum(r["statuses"].get(200, 0) for r in chats), sum(r["equal"] for r in chats)
    failed = [
        f"{name} {got}/{total}" for name, got in (("chats 200", ok), ("texts equal", equal)) if got != total
    ]
    if serves is None or serves > JOIN_DEADLINE_S:
        failed.append(f"newcomer serves after {serves} s (must be <= {JOIN_DEADLINE_S:.0f})")
    if any(t["dead"] != 0 for t in result["tables"]):
        failed.append("live peers declared dead (or a table unread)")
    if attack["statuses"].get(200, 0) < 10 * len(chats) * messages:
        failed.append(f"flood not delivered: {attack['statuses']}")
    print("must-hold:", "all held" if not failed else "FAILED: " + "; ".join(failed))
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="a tiny random 4-layer model (a quick check)")
    parser.add_argument("--chats", type=int, default=100, help="greedy chats through each honest peer")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--entries", type=int, default=5000, help="sybil entries a second to each peer")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each peer (0: the default)")
    args = parser.parse_args()
    if args.chats < 1 or args.max_tokens < 1 or args.entries < 1:
        parser.error("--chats, --max-tokens and --entries must be >= 1")
    if args.tiny:
        from tests.helpers import save_tiny_model

        args.model = str(save_tiny_model("llama", Path(tempfile.mkdtemp(prefix="attack-sybil-model-"))))
        split, args.newcomer = ["0:1", "1:3", "3:4"], "1:3"
    else:
        split, args.newcomer = ["0:10", "10:20", "20:30"], "10:20"
    from inference import resolve_model

    prompts = prompts_for(args.chats)
    expected = monolithic_texts(resolve_model(args.model).path, prompts, args.max_tokens)
    swarm = start_swarm(args.model, split, args.threads or None)
    try:
        result = under_flood(swarm, args, prompts, expected)
    finally:
        swarm.stop()
    return 1 if report(result, args, split) else 0


if __name__ == "__main__":
    sys.exit(main())
