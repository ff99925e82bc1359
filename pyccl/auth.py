"""The run secret: who may join a run, proven without sending the secret.

A run started with a secret admits only peers that hold it. The proof is a
challenge-response with fresh nonces from both sides (HMAC-SHA256 from the
standard library, compared in constant time), so the secret never crosses
the network, a recorded handshake cannot be replayed, and the peer learns
that it reached a master holding the same secret:

    peer   -> master   hello      Np (32 random bytes)
    master -> peer     challenge  Nm, HMAC(secret, "pyccl-v1 master" Np Nm)
    peer   -> master   auth       HMAC(secret, "pyccl-v1 peer" Np Nm)
    master -> peer     welcome    (or error kind "auth", then close)

The secret comes from ``secret=`` or, when none is given, from the
environment variable ``PYCCL_SECRET``; ``pyccl master --secret-file PATH``
reads it from a file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

NONCE_BYTES = 32
PROOF_BYTES = 32
ENV_VAR = "PYCCL_SECRET"
_MASTER = b"pyccl-v1 master"
_PEER = b"pyccl-v1 peer"
_EPOCH = b"pyccl-v1 epoch"
_PROBE = b"pyccl-v1 probe"


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """The run secret from the argument, else from ``PYCCL_SECRET``; None for an open run."""
    if secret is None:
        secret = os.environ.get(ENV_VAR) or None
    if secret is None:
        return None
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise ValueError("the run secret must not be empty")
    return raw


def read_secret_file(path: str | Path) -> bytes:
    """A secret kept in a file (one trailing newline is not part of it)."""
    raw = Path(path).read_bytes()
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    if not raw:
        raise ValueError(f"the secret file {path} is empty")
    return raw


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def master_proof(secret: bytes, peer_nonce: bytes, master_nonce: bytes) -> bytes:
    return hmac.new(secret, _MASTER + peer_nonce + master_nonce, hashlib.sha256).digest()


def peer_proof(secret: bytes, peer_nonce: bytes, master_nonce: bytes) -> bytes:
    return hmac.new(secret, _PEER + peer_nonce + master_nonce, hashlib.sha256).digest()


def epoch_key(secret: bytes, group: int, epoch: int, salt: bytes) -> bytes:
    """The key members prove membership of an epoch with on data-plane
    connections (ring links, state fetches, the torch side channel). Only
    holders of the secret who received the epoch's salt from the master (its
    members) can compute it; a peer expelled before the epoch cannot."""
    msg = _EPOCH + group.to_bytes(4, "little") + epoch.to_bytes(8, "little") + salt
    return hmac.new(secret, msg, hashlib.sha256).digest()


def probe_proof(secret: bytes, nonce: bytes, term: int, active: bool, address: str, silence_ms: int = 0) -> bytes:
    """A master's proof, in a probe to another master, that it holds the run
    secret (so a stranger cannot make a master step down)."""
    msg = (_PROBE + nonce + term.to_bytes(8, "little") + bytes([active]) + silence_ms.to_bytes(8, "little")
           + address.encode())
    return hmac.new(secret, msg, hashlib.sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(a, b)
