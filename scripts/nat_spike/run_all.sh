#!/bin/bash
# Every bench in turn (each brings the namespaces up and tears them down on exit). ~6 minutes.
HERE=$(cd "$(dirname "$0")" && pwd)
for b in aiortc iroh libp2p nebula capture; do
    timeout 420 bash "$HERE/run_$b.sh" >/dev/null 2>&1
    echo "### $b"; grep -vE 'level=' "$HERE/results_$b.txt"
done
if ip netns list | grep -q nsp-; then echo "namespaces left behind!"; exit 1; fi
