"""Sealed shadow instructions: a fixed-size opaque string only one peer can open (ephemeral X25519
to its sealing key, HKDF-SHA256, ChaCha20-Poly1305), or random bytes of the same length that no
one can; nobody else tells one from the other, so a frame never shows which hops are checked."""

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEAL_MESSAGE_BYTES = 32  # what a seal says, padded: a peer id (20 characters) and its tag
SEAL_BYTES = 32 + SEAL_MESSAGE_BYTES + 16  # ephemeral public key, ciphertext, Poly1305 tag
SEAL_CHARS = (SEAL_BYTES * 4 + 2) // 3  # unpadded base64url
SEAL_KEY_CHARS = 43  # an X25519 public key: 32 bytes, unpadded base64url
_INFO = b"layerswarm-seal-v1"
_NONCE = bytes(12)  # each seal's key is new (its ephemeral key): one nonce is safe
_TAG = b"LSS1"  # what an opened seal starts with


def encode_key(raw: bytes) -> str:
    """`raw` as unpadded base64url (keys, ids and signatures all travel so)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_key(text: str, size: int, what: str) -> bytes:
    """`text` as `size` bytes of unpadded base64url (ValueError naming `what` otherwise)."""
    if not isinstance(text, str) or len(text) != (size * 4 + 2) // 3:
        raise ValueError(f"{what} must be {size} bytes in unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError(f"{what} must be {size} bytes in unpadded base64url") from None
    if len(data) != size or encode_key(data) != text:  # one spelling per key: ids cannot be aliased
        raise ValueError(f"{what} must be {size} bytes in unpadded base64url")
    return data


def check_seal_key(value) -> str:
    """A gossiped sealing key: an X25519 public key (ValueError otherwise)."""
    decode_key(value, 32, "seal_key")
    return value


def public_seal_key(private: X25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return encode_key(raw)


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def seal(seal_key: str, message: bytes) -> str:
    """`message` (at most SEAL_MESSAGE_BYTES - 4 bytes) sealed to the owner of `seal_key`."""
    if len(message) > SEAL_MESSAGE_BYTES - len(_TAG):
        raise ValueError(f"a seal holds at most {SEAL_MESSAGE_BYTES - len(_TAG)} bytes, got {len(message)}")
    recipient = decode_key(seal_key, 32, "seal_key")
    ephemeral = X25519PrivateKey.generate()
    mine = decode_key(public_seal_key(ephemeral), 32, "ephemeral key")
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    padded = (_TAG + message).ljust(SEAL_MESSAGE_BYTES, b"\0")
    sealed = ChaCha20Poly1305(_key(shared, mine, recipient)).encrypt(_NONCE, padded, None)
    return encode_key(mine + sealed)


def blank_seal() -> str:
    """A seal with nothing to say: random bytes, as long as any seal."""
    return encode_key(os.urandom(SEAL_BYTES))


class SealKey:
    """A peer's X25519 sealing key, derived from its Ed25519 private key (HKDF-SHA256), so that
    an --identity file keeps it too; its public half is announced in the peer's signed record."""

    def __init__(self, identity_secret: bytes):
        derived = HKDF(hashes.SHA256(), 32, salt=None, info=b"layerswarm-seal-key-v1").derive(identity_secret)
        self._private = X25519PrivateKey.from_private_bytes(derived)
        self.public_key = public_seal_key(self._private)
        self._public_raw = decode_key(self.public_key, 32, "seal_key")

    def open(self, sealed: str) -> bytes | None:
        """What a seal to this key says (None: it is not one, or says nothing)."""
        try:
            raw = decode_key(sealed, SEAL_BYTES, "a seal")
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(raw[:32]))
            key = _key(shared, raw[:32], self._public_raw)
            padded = ChaCha20Poly1305(key).decrypt(_NONCE, raw[32:], None)
        except (ValueError, InvalidTag):
            return None
        if not padded.startswith(_TAG):
            return None
        return padded[len(_TAG) :].rstrip(b"\0")
