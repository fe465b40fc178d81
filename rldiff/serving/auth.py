"""The API key: a bearer token read from an environment variable or a file, compared in constant
time. The key itself is never logged, printed or returned; only whether one is configured."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

DEFAULT_ENV = "RLDIFF_API_KEY"
MIN_LENGTH = 16  # a shorter key is refused: it would be guessable


class ApiKey:
    """``check(authorization_header)`` -> None (allowed) or the reason it is refused."""

    def __init__(self, key: str | None):
        if key is not None and len(key) < MIN_LENGTH:
            raise ValueError(f"the API key must have at least {MIN_LENGTH} characters")
        self._key = None if key is None else key.encode()

    @classmethod
    def load(
        cls, env: str = DEFAULT_ENV, file: str | None = None, required: bool = False
    ) -> ApiKey:
        """The key from ``file`` (first line) if given, else from the environment variable ``env``;
        no key means no authentication, unless ``required``."""
        key = None
        if file:
            path = Path(file)
            if not path.is_file():
                raise ValueError(f"API key file {path} does not exist")
            key = path.read_text().strip() or None
        elif env and os.environ.get(env, "").strip():
            key = os.environ[env].strip()
        if key is None and required:
            where = f"file {file}" if file else f"environment variable {env}"
            raise ValueError(f"an API key is required but none was found in the {where}")
        return cls(key)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> str | None:
        if self._key is None:
            return None
        if not authorization:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "malformed Authorization header: expected 'Bearer <key>'"
        if not hmac.compare_digest(token.strip().encode(), self._key):
            return "invalid API key"
        return None

    def __repr__(self) -> str:  # never the key
        return f"ApiKey(enabled={self.enabled})"
