#!/bin/bash
# Nebula (Debian package `nebula`) across the NAT bench: a lighthouse that is also a relay in
# nsp-inet, a node in each home; then the project's own HTTP / websocket run over the overlay.
# usage: run_nebula.sh   (root; needs iptables, nebula, the project venv (.venv))
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
PPY="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python"
OUT=$HERE/results_nebula.txt
W=$(mktemp -d /tmp/nsp.XXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    bash "$HERE/netns.sh" down
    rm -rf "$W"
}
trap cleanup EXIT INT TERM
bash "$HERE/netns.sh" up || exit 1
: >"$OUT"
cd "$W"
nebula-cert ca -name layerswarm-spike -duration 24h >/dev/null
sign() { nebula-cert sign -name "$1" -ip "$2/24" >/dev/null; }
sign lh 10.42.0.1; sign home1 10.42.0.11; sign home2 10.42.0.12; sign home3 10.42.0.13

conf() { # name listen_port am_lighthouse
    local relay_block
    if [ "$3" = true ]; then
        relay_block="relay:
  am_relay: true
  use_relays: true"
    else
        relay_block="relay:
  relays: [10.42.0.1]
  use_relays: true"
    fi
    cat >"$1.yml" <<EOF
pki: {ca: $W/ca.crt, cert: $W/$1.crt, key: $W/$1.key}
static_host_map: {"10.42.0.1": ["10.200.0.1:4242"]}
lighthouse: {am_lighthouse: $3, interval: 5, hosts: $( [ "$3" = true ] && echo '[]' || echo '[10.42.0.1]')}
listen: {host: 0.0.0.0, port: $2}
punchy: {punch: true, respond: true, delay: 1s}
$relay_block
tun: {dev: nebula1, mtu: 1300}
logging: {level: info}
firewall:
  outbound: [{port: any, proto: any, host: any}]
  inbound: [{port: any, proto: any, host: any}]
EOF
}
conf lh 4242 true; conf home1 0 false; conf home2 0 false; conf home3 0 false
for n in inet:lh home1:home1 home2:home2 home3:home3; do
    ns=nsp-${n%%:*}; name=${n##*:}
    ip netns exec "$ns" nebula -config "$W/$name.yml" >"$W/$name.log" 2>&1 &
    PIDS+=($!)
done
sleep 4
# byte counters on home1's router: to the lighthouse/relay vs straight to the other home's router
for d in 10.200.0.1 10.200.0.13 10.200.0.12; do
    ip netns exec nsp-nat1 iptables -I FORWARD -o wan -d "$d" -p udp
done
count() { echo "-- $1: UDP bytes home1's router sent to: relay 10.200.0.1, nat3 10.200.0.13, nat2 10.200.0.12" | tee -a "$OUT"
    ip netns exec nsp-nat1 iptables -L FORWARD -v -n -x | awk '$3=="17" {print $8, $2}' | tee -a "$OUT"
    ip netns exec nsp-nat1 iptables -Z FORWARD; }
# servers in home3 (cone) and home2 (symmetric); client in home1 (cone)
for ns in home3:10.42.0.13 home2:10.42.0.12; do
    ip netns exec "nsp-${ns%%:*}" timeout 120 $PPY "$HERE/http_bench.py" serve "${ns##*:}" 18080 110 >"$W/srv-${ns%%:*}.log" 2>&1 &
    PIDS+=($!)
done
sleep 2
count setup
for m in http ws; do
    ip netns exec nsp-home1 timeout 60 $PPY "$HERE/http_bench.py" $m 10.42.0.13 18080 nebula-cone-cone 2>&1 | tee -a "$OUT"
    count "after $m to home3"
    ip netns exec nsp-home1 timeout 60 $PPY "$HERE/http_bench.py" $m 10.42.0.12 18080 nebula-cone-symmetric 2>&1 | tee -a "$OUT"
    count "after $m to home2"
done
echo "== how home1 reaches each (nebula log lines about handshakes / relays)" >>"$OUT"
grep -iE 'relay|handshake message received|Handshake message sent' "$W/home1.log" | tail -15 >>"$OUT"
