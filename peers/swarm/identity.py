"""A peer's Ed25519 identity: its peer id is derived from its public key, and it signs its own
gossip entry (so that no one else can forge, move, revive or kill it) and its answers to gossip
(so that a caller knows which peer answered at an address).

`--identity FILE` keeps one identity across restarts (created on first start, mode 0600, a
PKCS#8 PEM file); without it a peer has a new identity each time it starts. A key file that its
group or others may read or write is refused (whoever holds the key is this peer in the swarm). The `cryptography`
package does the curve arithmetic (OpenSSL underneath): constant-time, well reviewed, and already
what most Python TLS stacks install.
"""

import base64
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peers.swarm.seals import SealKey, decode_key, encode_key

PEER_ID_CHARS = 20  # base32 characters of sha256(public key): 100 bits
PUBLIC_KEY_CHARS = 43  # 32 bytes, base64url without padding
SIGNATURE_CHARS = 86  # 64 bytes
KEY_FILE_MODE = 0o600  # a key file: its owner's alone
MAX_KEY_FILE_BYTES = 64 << 10  # a PEM Ed25519 key is ~120 bytes


def peer_id_of(public_key: str) -> str:
    """The peer id a public key owns (ValueError if it is not an Ed25519 public key's spelling)."""
    raw = decode_key(public_key, 32, "public_key")
    return base64.b32encode(hashlib.sha256(raw).digest()).decode().lower()[:PEER_ID_CHARS]


def verify(public_key: str, signature: str, message: bytes) -> bool:
    """Whether `signature` is the owner of `public_key`'s signature of `message`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(decode_key(public_key, 32, "public_key"))
        key.verify(decode_key(signature, 64, "signature"), message)
    except (ValueError, InvalidSignature):
        return False
    return True


def check_private(path: Path, st: os.stat_result) -> None:
    """Refuse a key file that is not a regular file, or that its group or others may read or
    write (ValueError naming the file, its mode and the fix)."""
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file: --identity takes a PEM private key file")
    if os.name == "posix" and st.st_mode & 0o066:
        raise ValueError(
            f"{path} is open to its group or others (mode {stat.S_IMODE(st.st_mode):04o}): a peer's "
            f"private key must be its owner's alone; run: chmod 600 {path}"
        )


class Identity:
    """An Ed25519 key pair and the peer id derived from its public key; its X25519 sealing key
    (peers/swarm/seals.py) is derived from the private key, so a key file keeps both."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = encode_key(raw)
        self.peer_id = peer_id_of(self.public_key)
        secret = private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        self._sealing = SealKey(secret)
        self.seal_key = self._sealing.public_key  # X25519, unpadded base64url: others seal to it

    def raw_secret(self) -> bytes:
        """The 32-byte Ed25519 private key, for a transport keyed by the same identity
        (peers/transport/p2p.py: its libp2p peer id is this key)."""
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "Identity":
        """The identity kept in `path`; a new one is written there (0600) if the file is absent.
        ValueError if the file is not a private key, or is open to its group or others."""
        path = Path(path)
        try:  # (without blocking: a FIFO would hold the open until someone writes to it)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            if os.path.islink(path) and not os.path.exists(path):
                raise ValueError(f"{path} is a link to a file that does not exist") from None
            if os.path.lexists(path):  # another peer starting beside this one wrote it just now
                return cls.load_or_create(path)
            return cls._create(path)
        try:
            check_private(path, os.fstat(fd))
            pem = os.read(fd, MAX_KEY_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(pem) > MAX_KEY_FILE_BYTES:
            raise ValueError(f"{path} is not a PEM private key: it has more than {MAX_KEY_FILE_BYTES} bytes")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    @classmethod
    def _create(cls, path: Path) -> "Identity":
        """A new identity, written to `path` as its owner's alone (mode 0600), whole or not at
        all: a peer starting beside this one with the same file reads the key or no file."""
        identity = cls.generate()
        pem = identity._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(6)}.new")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            with os.fdopen(os.open(draft, flags, KEY_FILE_MODE), "wb") as f:
                if hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), KEY_FILE_MODE)  # exactly 0600, whatever the umask
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(draft, path)  # fails if another peer wrote one first: that one is the key
            except FileExistsError:
                return cls.load_or_create(path)
        finally:
            draft.unlink(missing_ok=True)
        return identity

    def sign(self, message: bytes) -> str:
        return encode_key(self._key.sign(message))

    def unseal(self, sealed: str) -> bytes | None:
        """What a seal to this peer says (None: it is not one to this peer, or says nothing)."""
        return self._sealing.open(sealed)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
