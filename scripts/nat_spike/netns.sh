#!/bin/bash
# A NAT bench made of Linux network namespaces (all names start with "nsp-").
#
#   nsp-inet   "the internet": bridge br0, 10.200.0.1/24 (relay / STUN / TURN / lighthouse here)
#   nsp-nat1   router 10.200.0.11 <-> 192.168.1.1  MASQUERADE              (port-restricted cone)
#   nsp-nat3   router 10.200.0.13 <-> 192.168.3.1  MASQUERADE              (port-restricted cone)
#   nsp-nat2   router 10.200.0.12 <-> 192.168.2.1  MASQUERADE --random-fully (symmetric)
#   nsp-home1  192.168.1.2 (behind nat1)   nsp-home3 192.168.3.2 (behind nat3)
#   nsp-home2  192.168.2.2 (behind nat2)
# Routers drop NEW packets from the wan side (forwarded or to themselves): nobody outside can dial a home.
#
# usage: netns.sh up | down
set -u
NS="nsp-inet nsp-nat1 nsp-nat2 nsp-nat3 nsp-home1 nsp-home2 nsp-home3"

down() {
    for n in $NS; do ip netns del "$n" 2>/dev/null; done
    return 0
}

router() { # router N random(0/1)
    local n=$1 rnd=$2 nat=nsp-nat$1 home=nsp-home$1
    ip link add "nspw$n" type veth peer name "nspwb$n"
    ip link set "nspw$n" netns "$nat"
    ip link set "nspwb$n" netns nsp-inet
    ip -n nsp-inet link set "nspwb$n" master br0 up
    ip -n "$nat" link set "nspw$n" name wan up
    ip -n "$nat" addr add "10.200.0.1$n/24" dev wan
    ip link add "nspl$n" type veth peer name "nsph$n"
    ip link set "nspl$n" netns "$nat"
    ip link set "nsph$n" netns "$home"
    ip -n "$nat" link set "nspl$n" name lan up
    ip -n "$nat" addr add "192.168.$n.1/24" dev lan
    ip -n "$home" link set "nsph$n" name eth0 up
    ip -n "$home" addr add "192.168.$n.2/24" dev eth0
    ip -n "$home" route add default via "192.168.$n.1"
    ip netns exec "$nat" sysctl -qw net.ipv4.ip_forward=1
    local extra=""
    [ "$rnd" = 1 ] && extra="--random-fully"
    ip netns exec "$nat" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE $extra
    ip netns exec "$nat" iptables -A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip netns exec "$nat" iptables -A FORWARD -i wan -j DROP
    # Unsolicited packets to the router itself are dropped too (as a home router does). Were they
    # accepted (answered with ICMP), conntrack would keep an entry for them that clashes with the
    # mapping a punch needs, and MASQUERADE would pick another port: symmetric by accident.
    ip netns exec "$nat" iptables -A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    ip netns exec "$nat" iptables -A INPUT -i wan -j DROP
}

up() {
    down
    set -e
    for n in $NS; do
        ip netns add "$n"
        ip -n "$n" link set lo up
    done
    ip -n nsp-inet link add br0 type bridge
    ip -n nsp-inet link set br0 up
    ip -n nsp-inet addr add 10.200.0.1/24 dev br0
    # Packets for addresses nobody routes (a home's private address in an ICE candidate) vanish,
    # as on the internet, instead of failing at once (coturn's relay socket would stop sending
    # after an ENETUNREACH, as the first test here showed).
    ip -n nsp-inet link add sink0 type veth peer name sink1
    ip -n nsp-inet link set sink0 up
    ip -n nsp-inet link set sink1 up
    ip -n nsp-inet route add default dev sink0
    router 1 0
    router 2 1
    router 3 0
    set +e
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
