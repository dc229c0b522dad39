#!/bin/bash
# py-libp2p: a circuit relay v2 in nsp-inet, a listener behind NAT that reserves a slot on it,
# a dialer behind another NAT that reaches the listener through the relay, then tries DCUtR.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
SPY=/tmp/spikevenv/bin/python
OUT=$HERE/results_libp2p.txt
W=$(mktemp -d /tmp/nsp.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 0.3; bash "$HERE/netns.sh" down; rm -rf "$W"; }
trap cleanup EXIT INT TERM
bash "$HERE/netns.sh" up || exit 1
: >"$OUT"
ip netns exec nsp-inet timeout 300 $SPY "$HERE/libp2p_bench.py" relay 4001 "$W/relay.json" 290 >"$W/relay.log" 2>&1 &
PIDS+=($!)
sleep 3
pair() { # label ns_listener ns_dialer
    local label=$1
    RELAY_HOST=10.200.0.1 ip netns exec "$2" timeout 120 $SPY "$HERE/libp2p_bench.py" listen "$W/relay.json" "$W/$label.json" 110 >"$W/$label.l.log" 2>&1 &
    local p=$!
    sleep 5
    echo "== libp2p $label ($3 -> $2)" | tee -a "$OUT"
    RELAY_HOST=10.200.0.1 ip netns exec "$3" timeout 110 $SPY "$HERE/libp2p_bench.py" dial "$W/relay.json" "$W/$label.json" "$label" --punch 2>&1 \
        | grep -E 'RESULT|relayed conn|stream over|hole|reserv|Error:' | tee -a "$OUT"
    kill $p 2>/dev/null; wait $p 2>/dev/null
}
pair cone-cone nsp-home3 nsp-home1
pair cone-symmetric nsp-home2 nsp-home1
