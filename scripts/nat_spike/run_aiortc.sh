#!/bin/bash
# aiortc + coturn across the NAT bench (netns.sh), plus the project's HTTP / websocket baselines.
# usage: run_aiortc.sh   (root; needs: iptables, coturn, /tmp/spikevenv with aiortc, the project venv (.venv))
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
SPY=/tmp/spikevenv/bin/python
PPY="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python"
OUT=$HERE/results_aiortc.txt
W=$(mktemp -d /tmp/nsp.XXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.3
    bash "$HERE/netns.sh" down
    rm -rf "$W"
}
trap cleanup EXIT INT TERM
bash "$HERE/netns.sh" up || exit 1
: >"$OUT"
nsx() { # run in a namespace; "nsp-root": in the machine's own
    local ns=$1; shift
    if [ "$ns" = nsp-root ]; then "$@"; else ip netns exec "$ns" "$@"; fi
}

ip netns exec nsp-inet turnserver -n --listening-ip=10.200.0.1 --relay-ip=10.200.0.1 --listening-port=3478 \
    --lt-cred-mech --user=ls:ls --realm=layerswarm --no-tls --no-dtls --no-cli --fingerprint \
    --min-port=49152 --max-port=49400 --log-file=stdout --simple-log >"$W/turn.log" 2>&1 &
PIDS+=($!)
sleep 1

pair() { # label ns_answer ns_offer extra-args...
    local label=$1 na=$2 no=$3; shift 3
    local d=$W/$label
    mkdir -p "$d"
    nsx "$na" timeout 90 $SPY "$HERE/aiortc_bench.py" answer "$d" --serve-s 80 "$@" >"$d/answer.log" 2>&1 &
    local pa=$!
    sleep 0.5
    echo "== aiortc $label ($no -> $na) $*" | tee -a "$OUT"
    nsx "$no" timeout 90 $SPY "$HERE/aiortc_bench.py" offer "$d" --label "$label" "$@" 2>&1 | tee -a "$OUT" | grep -E 'RESULT|connected|Error|error' 
    kill $pa 2>/dev/null; wait $pa 2>/dev/null
}
STUN=(--stun stun:10.200.0.1:3478 --turn turn:10.200.0.1:3478)
# 1. loopback (host candidates), no servers
pair loopback nsp-root nsp-root
# 2. two cone NATs: hole punching (srflx)
pair cone-cone nsp-home3 nsp-home1 "${STUN[@]}"
# 3. cone <-> symmetric: punching fails, TURN carries it
pair cone-symmetric nsp-home2 nsp-home1 "${STUN[@]}"
# 4. two cone NATs, forced through TURN (what a relayed hop costs)
pair cone-cone-relay nsp-home3 nsp-home1 "${STUN[@]}" --relay-only

# baselines: the project's transports, loopback and home1 -> a public address (outbound through NAT)
echo "== baselines" | tee -a "$OUT"
timeout 60 $PPY "$HERE/http_bench.py" serve 127.0.0.1 18080 50 >"$W/h1.log" 2>&1 &
PIDS+=($!)
ip netns exec nsp-inet timeout 60 $PPY "$HERE/http_bench.py" serve 10.200.0.1 18080 50 >"$W/h2.log" 2>&1 &
PIDS+=($!)
sleep 2
for m in http ws; do
    timeout 60 $PPY "$HERE/http_bench.py" $m 127.0.0.1 18080 loopback 2>&1 | tee -a "$OUT"
    nsx nsp-home1 timeout 60 $PPY "$HERE/http_bench.py" $m 10.200.0.1 18080 home1-to-public 2>&1 | tee -a "$OUT"
done
echo "== turn log (allocations)" >>"$OUT"
grep -iE 'session|alloc|peer' "$W/turn.log" | tail -20 >>"$OUT"
