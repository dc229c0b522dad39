#!/bin/bash
# What the benches need on this machine (Debian 12, root): Debian packages and a separate venv.
set -eu
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables iproute2 coturn nebula tcpdump libgmp-dev build-essential
python3 -m venv /tmp/spikevenv
/tmp/spikevenv/bin/pip install -q aiortc==1.16.0 iroh==1.2.0 libp2p==0.8.1 httpx cryptography
# the HTTP / websocket baselines run in the project's own venv (the project venv (.venv)): nothing added there
