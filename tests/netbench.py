"""A small internet made of Linux network namespaces, for tests of peers behind NAT (root only).

    <p>-inet   "the internet": bridge br0 10.231.0.1/24; this process reaches it through a veth
               of its own (10.231.0.254), so tests talk to public peers as a client would
    <p>-nat1   a home router: 10.231.0.11 on the internet, 192.168.231.1 at home; MASQUERADE
               (`random_fully`: --random-fully, a symmetric NAT)
    <p>-home1  192.168.231.2 behind it: it can dial out; nobody can dial in

Routers drop every unsolicited packet from the internet side, forwarded or to themselves (as
home routers do; an answered one leaves a conntrack entry that changes the NAT's mapping), and
the internet namespace has a default route that swallows packets (a veth pair), so that a send
to a private address vanishes instead of failing at once. Names carry this process's id; every
namespace is removed on leaving, whatever happened."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PUBLIC_NET, HOME_NET = "10.231.0", "192.168.231"


def available() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (scripts/install installs them)" if missing else None


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@dataclass
class Net:
    prefix: str

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    @property
    def home(self) -> str:
        return f"{self.prefix}-home1"

    @property
    def router(self) -> str:
        return f"{self.prefix}-nat1"

    public_ip = f"{PUBLIC_NET}.1"  # where a public peer listens
    router_ip = f"{PUBLIC_NET}.11"  # what the internet sees of the home
    home_ip = f"{HOME_NET}.2"

    def exec(self, namespace: str) -> list[str]:
        """The command prefix that runs a program inside `namespace`."""
        return ["ip", "netns", "exec", namespace]

    def namespaces(self) -> list[str]:
        return [self.inet, self.router, self.home]


def _internet(net: Net, tag: str) -> None:
    """The bridge, its packet-swallowing default route, and this process's leg on it."""
    inet = net.inet
    _run("ip", "-n", inet, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", inet, "link", "set", "br0", "up")
    _run("ip", "-n", inet, "addr", "add", f"{net.public_ip}/24", "dev", "br0")
    _run("ip", "-n", inet, "link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
    for dev in ("sink0", "sink1"):
        _run("ip", "-n", inet, "link", "set", dev, "up")
    _run("ip", "-n", inet, "route", "add", "default", "dev", "sink0")
    _run("ip", "link", "add", f"lsc{tag}", "type", "veth", "peer", "name", f"lscb{tag}")
    _run("ip", "link", "set", f"lscb{tag}", "netns", inet)
    _run("ip", "-n", inet, "link", "set", f"lscb{tag}", "master", "br0", "up")
    _run("ip", "addr", "add", f"{PUBLIC_NET}.254/24", "dev", f"lsc{tag}")
    _run("ip", "link", "set", f"lsc{tag}", "up")


def _home(net: Net, tag: str, random_fully: bool) -> None:
    """The router (wan on the internet, lan at home, NAT and drops) and the home behind it."""
    inet, nat, home = net.inet, net.router, net.home
    _run("ip", "link", "add", f"lsw{tag}", "type", "veth", "peer", "name", f"lswb{tag}")
    _run("ip", "link", "set", f"lsw{tag}", "netns", nat)
    _run("ip", "link", "set", f"lswb{tag}", "netns", inet)
    _run("ip", "-n", inet, "link", "set", f"lswb{tag}", "master", "br0", "up")
    _run("ip", "-n", nat, "link", "set", f"lsw{tag}", "name", "wan", "up")
    _run("ip", "-n", nat, "addr", "add", f"{net.router_ip}/24", "dev", "wan")
    _run("ip", "link", "add", f"lsl{tag}", "type", "veth", "peer", "name", f"lsh{tag}")
    _run("ip", "link", "set", f"lsl{tag}", "netns", nat)
    _run("ip", "link", "set", f"lsh{tag}", "netns", home)
    _run("ip", "-n", nat, "link", "set", f"lsl{tag}", "name", "lan", "up")
    _run("ip", "-n", nat, "addr", "add", f"{HOME_NET}.1/24", "dev", "lan")
    _run("ip", "-n", home, "link", "set", f"lsh{tag}", "name", "eth0", "up")
    _run("ip", "-n", home, "addr", "add", f"{net.home_ip}/24", "dev", "eth0")
    _run("ip", "-n", home, "route", "add", "default", "via", f"{HOME_NET}.1")
    ipt = [*net.exec(nat), "iptables"]
    _run(*net.exec(nat), "sysctl", "-qw", "net.ipv4.ip_forward=1")
    masquerade = ["-j", "MASQUERADE", *(["--random-fully"] if random_fully else [])]
    _run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade)
    for chain in ("FORWARD", "INPUT"):
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        _run(*ipt, "-A", chain, "-i", "wan", *established)
        _run(*ipt, "-A", chain, "-i", "wan", "-j", "DROP")


@contextmanager
def small_internet(random_fully: bool = False) -> Iterator[Net]:
    """One public network and one home behind a NAT router (see the module's docstring)."""
    net = Net(f"ls{os.getpid() % 100000}")
    tag = net.prefix[2:]
    try:
        for ns in net.namespaces():
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _internet(net, tag)
        _home(net, tag, random_fully)
        yield net
    finally:
        for ns in net.namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"lsc{tag}"], capture_output=True, timeout=30)
