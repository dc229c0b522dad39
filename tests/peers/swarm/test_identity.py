"""`--identity FILE` (peers/swarm/identity.py): a key file its group or others may read or write
is refused with the file, its mode and the fix, by the Identity and by `peer serve`; a new key
file is its owner's alone (0600, whatever the umask) and appears whole; a file that is not a
regular file is refused without hanging."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from peers.swarm.identity import Identity
from tests.peers.processes import free_port


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o666, 0o620], ids=oct)
def test_a_key_file_open_to_others_is_refused_naming_it_its_mode_and_the_fix(tmp_path, mode):
    path = tmp_path / "peer.pem"
    Identity.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(ValueError) as refused:
        Identity.load_or_create(path)
    message = str(refused.value)
    assert str(path) in message and f"mode {mode:04o}" in message, message
    assert f"chmod 600 {path}" in message, message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700], ids=oct)
def test_a_key_file_of_its_owner_alone_keeps_the_identity(tmp_path, mode):
    path = tmp_path / "peer.pem"
    made = Identity.load_or_create(path)
    os.chmod(path, mode)
    assert Identity.load_or_create(path).peer_id == made.peer_id


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=oct)
def test_a_new_key_file_is_0600_whatever_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        made = Identity.load_or_create(tmp_path / "keys" / "peer.pem")
    finally:
        os.umask(before)
    assert mode_of(tmp_path / "keys" / "peer.pem") == 0o600
    assert mode_of(tmp_path / "keys") & 0o077 == 0  # a directory made for it is private too
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["peer.pem"]  # no draft left
    assert Identity.load_or_create(tmp_path / "keys" / "peer.pem").peer_id == made.peer_id


def test_peers_creating_one_key_file_at_once_agree_on_it(tmp_path):
    path, start = tmp_path / "peer.pem", threading.Barrier(8)
    ids = []

    def create():
        start.wait()
        ids.append(Identity.load_or_create(path).peer_id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ids) == 8 and len(set(ids)) == 1, ids
    assert Identity.load_or_create(path).peer_id == ids[0]


def refusal(path) -> str:
    """Why loading `path` fails, waiting 30 s at most (a FIFO's open would wait for a writer)."""
    outcome: list = []

    def load():
        try:
            Identity.load_or_create(path)
            outcome.append("loaded")
        except ValueError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive() and stat.S_ISFIFO(os.lstat(path).st_mode):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # lets it go
    assert outcome, f"loading {path} did not end within 30 s"
    return outcome[0]


def test_what_is_not_a_key_file_is_refused_without_hanging(tmp_path):
    fifo, broken, big = tmp_path / "fifo", tmp_path / "broken", tmp_path / "big.pem"
    os.mkfifo(fifo, 0o600)
    os.symlink(tmp_path / "nowhere", broken)
    big.write_bytes(b"x" * (1 << 20))
    os.chmod(big, 0o600)
    cases = [
        (fifo, "is not a regular file"),
        (tmp_path, "is not a regular file"),
        (broken, "is a link to a file that does not exist"),
        (big, "is not a PEM private key"),
    ]
    for path, says in cases:
        assert says in refusal(path), path


def test_peer_serve_refuses_a_world_readable_key_file_in_one_line(tiny_llama, tmp_path):
    path = tmp_path / "peer.pem"
    Identity.load_or_create(path)
    os.chmod(path, 0o644)
    args = ["serve", "--model", str(tiny_llama), "--layers", "0:4", "--port", str(free_port())]
    cmd = [sys.executable, "-m", "peers.cli", *args, "--identity", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"peer: error: {path} is open to its group or others (mode 0644)"), line
    assert line.endswith(f"run: chmod 600 {path}"), line
