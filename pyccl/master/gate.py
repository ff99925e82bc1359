"""The master's gate: the run-secret check of a connection (see pyccl/auth.py).

:class:`Gate` holds the secret and decides, without any I/O: what a
``hello`` is answered with (a ``challenge``, or nothing to check in an open
run), whether an ``auth`` proves the secret, and whether a refusal from a
source is worth a log line (once per source address).
"""

from __future__ import annotations

from collections.abc import Callable

from pyccl import auth
from pyccl import protocol as P
from pyccl.wire import FrameError

__all__ = ["AuthRefused", "Gate"]

MAX_LOGGED_SOURCES = 4096


class AuthRefused(FrameError):
    """A connection failed the run-secret check (closed with an ``error`` of kind ``auth``)."""


class Gate:
    def __init__(self, secret: bytes | None, nonce: Callable[[], bytes]) -> None:
        self.secret = secret
        self._nonce = nonce
        self._logged: set[str] = set()

    @property
    def open(self) -> bool:
        """No secret: every hello is welcomed."""
        return self.secret is None

    def challenge(self, hello: P.Hello) -> P.Challenge:
        """The answer to a hello in a run with a secret (keep its nonce for :meth:`check`)."""
        assert self.secret is not None
        if hello.nonce is None:
            raise AuthRefused("this master requires the run secret; the peer sent no challenge nonce")
        nonce = self._nonce()
        return P.Challenge(nonce, auth.master_proof(self.secret, hello.nonce, nonce))

    def check(self, hello: P.Hello, challenge: bytes, frame: P.Auth) -> None:
        """Raise AuthRefused unless ``frame`` proves the secret for this handshake."""
        assert self.secret is not None and hello.nonce is not None
        if not auth.same(frame.proof, auth.peer_proof(self.secret, hello.nonce, challenge)):
            raise AuthRefused("authentication failed: the peer does not hold this run's secret")

    def first_refusal(self, addr: str) -> bool:
        """Whether this source's refusal should be logged (once per source address)."""
        source = addr.rpartition(":")[0] or addr
        if source in self._logged:
            return False
        if len(self._logged) >= MAX_LOGGED_SOURCES:
            self._logged.clear()
        self._logged.add(source)
        return True

    def salt(self) -> bytes | None:
        """A fresh salt for an epoch's key (a run with a secret), else None."""
        return None if self.secret is None else self._nonce()
