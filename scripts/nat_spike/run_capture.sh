#!/bin/bash
# What a relay sees: hidden-state-like payloads (runs of float32 1.5) sent home1 -> home2 (symmetric
# NAT, so relayed), with everything crossing the public bridge captured in nsp-inet; then the
# capture is searched for the plaintext runs. Control: plain HTTP home1 -> a public server.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
SPY=/tmp/spikevenv/bin/python
PPY="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python"
OUT=$HERE/results_capture.txt
W=$(mktemp -d /tmp/nsp.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 0.5; bash "$HERE/netns.sh" down; rm -rf "$W"; }
trap cleanup EXIT INT TERM
bash "$HERE/netns.sh" up || exit 1
: >"$OUT"
export HIDDEN_STATES=1
cap() { ip netns exec nsp-inet timeout 120 tcpdump -q -i br0 -s 0 -w "$W/$1.pcap" >/dev/null 2>&1 & CAP=$!; sleep 1; }
uncap() { sleep 1; kill -INT $CAP; wait $CAP 2>/dev/null; python3 "$HERE/pcap_find.py" "$W/$1.pcap" | sed "s|$W/||" | tee -a "$OUT"; }

# control: plain HTTP through the NAT to a public server
ip netns exec nsp-inet timeout 60 $PPY "$HERE/http_bench.py" serve 10.200.0.1 18080 50 >/dev/null 2>&1 &
PIDS+=($!); sleep 2
cap http-plain
ip netns exec nsp-home1 timeout 60 $PPY "$HERE/http_bench.py" http 10.200.0.1 18080 control | grep RESULT | tee -a "$OUT"
uncap http-plain

# aiortc through coturn
ip netns exec nsp-inet turnserver -n --listening-ip=10.200.0.1 --relay-ip=10.200.0.1 --listening-port=3478 \
    --lt-cred-mech --user=ls:ls --realm=layerswarm --no-tls --no-dtls --no-cli --fingerprint \
    --min-port=49152 --max-port=49400 --log-file=stdout --simple-log >"$W/turn.log" 2>&1 &
PIDS+=($!); sleep 1
cap aiortc-turn
mkdir -p "$W/rtc"
ip netns exec nsp-home2 timeout 90 $SPY "$HERE/aiortc_bench.py" answer "$W/rtc" --serve-s 80 --stun stun:10.200.0.1:3478 --turn turn:10.200.0.1:3478 >/dev/null 2>&1 &
A=$!; sleep 0.5
ip netns exec nsp-home1 timeout 90 $SPY "$HERE/aiortc_bench.py" offer "$W/rtc" --label capture --stun stun:10.200.0.1:3478 --turn turn:10.200.0.1:3478 2>&1 | grep -E 'RESULT|connected' | tee -a "$OUT"
kill $A 2>/dev/null
uncap aiortc-turn

# py-libp2p circuit relay
ip netns exec nsp-inet timeout 100 $SPY "$HERE/libp2p_bench.py" relay 4001 "$W/relay.json" 90 >/dev/null 2>&1 &
PIDS+=($!); sleep 3
RELAY_HOST=10.200.0.1 ip netns exec nsp-home2 timeout 90 $SPY "$HERE/libp2p_bench.py" listen "$W/relay.json" "$W/l.json" 80 >/dev/null 2>&1 &
PIDS+=($!); sleep 5
cap libp2p-relay
RELAY_HOST=10.200.0.1 ip netns exec nsp-home1 timeout 90 $SPY "$HERE/libp2p_bench.py" dial "$W/relay.json" "$W/l.json" capture 2>&1 | grep -E 'RESULT|stream over' | tee -a "$OUT"
uncap libp2p-relay
