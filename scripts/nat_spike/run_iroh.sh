#!/bin/bash
# iroh (relays disabled: no iroh relay server can run here) on loopback and across the NAT bench.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
SPY=/tmp/spikevenv/bin/python
OUT=$HERE/results_iroh.txt
W=$(mktemp -d /tmp/nsp.XXXX)
cleanup() { bash "$HERE/netns.sh" down; rm -rf "$W"; }
trap cleanup EXIT INT TERM
bash "$HERE/netns.sh" up || exit 1
: >"$OUT"
run() { # label ns_server bind ns_client
    local label=$1 ns=$2 bind=$3 nc=$4
    ip netns exec "$ns" timeout 60 $SPY "$HERE/iroh_bench.py" serve "$W/$label.json" "$bind" 50 >"$W/$label.log" 2>&1 &
    local p=$!
    sleep 2
    echo "== iroh $label" | tee -a "$OUT"
    ip netns exec "$nc" timeout 40 $SPY "$HERE/iroh_bench.py" dial "$W/$label.json" "$label" 2>&1 | grep -E 'RESULT|connected|Error|rror' | tail -3 | tee -a "$OUT"
    kill $p 2>/dev/null; wait $p 2>/dev/null
}
ip -n nsp-inet link set lo up
run loopback nsp-inet 127.0.0.1:0 nsp-inet
run home1-to-public nsp-inet 10.200.0.1:0 nsp-home1
run home1-to-home3-no-relay nsp-home3 0.0.0.0:0 nsp-home1
