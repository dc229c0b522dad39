"""Benchmark: the failover stall, i.e. the longest gap between two streamed tokens when a peer is
killed (kill -9) in the middle of a greedy generation, against the longest gap of an unfailed run
in the same swarm. Default model on loopback: an entry peer and two replicas of each third.

    python scripts/bench_failover.py [--runs 5] [--max-tokens 64] [--kill-after 16]
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.peers.processes import Swarm, serving_replica, stream_chat, wait_until  # noqa: E402

SPANS = ("0:10", "10:20", "20:30")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=16, help="tokens streamed before the kill")
    args = parser.parse_args()

    swarm = Swarm("smollm2-135m", Path(tempfile.mkdtemp(prefix="bench-failover-")), threads=None)
    try:
        entry = swarm.add("0:1")  # never on a route: routes take the fewest hops
        for layers in SPANS:
            swarm.add(layers)
            swarm.add(layers)
        swarm.wait_ready(timeout_s=300)
        swarm.wait_route(entry)
        wait_until(lambda: all(len(p.table()["peers"]) == 7 for p in swarm.peers), 60)
        reference, _, _ = stream_chat(entry, n=args.max_tokens)
        calm, stalls = [], []
        for run in range(args.runs):
            layers = SPANS[run % len(SPANS)]  # first, middle and last thirds in turn
            _, _, gaps = stream_chat(entry, n=args.max_tokens)
            calm.append(max(gaps))
            killed = []

            def on_token(count, layers=layers, killed=killed):
                if count == args.kill_after and not killed:
                    victim = serving_replica(swarm, layers)
                    victim.kill()
                    killed.append(victim)

            text, _, gaps = stream_chat(entry, on_token, n=args.max_tokens)
            assert killed and text == reference, "the failed-over text differs from the unfailed one"
            stalls.append(max(gaps))
            print(
                f"run {run + 1}: killed a replica of layers {layers}: longest gap {max(gaps) * 1e3:.0f} ms "
                f"(unfailed run: {calm[-1] * 1e3:.0f} ms)",
                flush=True,
            )
            killed[0].start()  # the same peer comes back for the next run
            swarm.wait_ready()
            wait_until(lambda: all(r["status"] == "serving" for r in entry.table()["peers"]), 60)
    finally:
        swarm.stop()
    print(
        f"failover stall (longest inter-token gap), median of {args.runs} runs: "
        f"{statistics.median(stalls) * 1e3:.0f} ms with a kill -9, {statistics.median(calm) * 1e3:.0f} ms without"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
