"""API keys as the provider holds them: where they come from and what is written down instead.

Keys are given as ``KEY`` (no quota) or ``KEY:QUOTA``, on the command line, in
a file (one a line, ``#`` comments) or in the ``B2KD_SERVE_KEYS`` environment
variable (separated by spaces or commas), so they need not show in ``ps``.

The server never stores or logs a key: it writes its *key id*, an HMAC-SHA256
of the key under a server secret. Without the secret a key id cannot be
checked against guessed keys (an unsalted hash of a weak key can). The secret
lives in a file created with permissions 0600 (``OUT/secret`` by default), or
is given, so that several hosts sharing one store compute the same ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEYS_ENV = "B2KD_SERVE_KEYS"
SECRET_BYTES = 32
#: What :func:`key_id` checks the secret against in a store (its fingerprint, not the secret).
_CHECK = b"b2kd key secret check"


class KeySetupError(ValueError):
    """A key, key file or secret that cannot be used; the message says why."""


#: The largest quota a key may have: far above any real budget, and within SQLite's 64-bit integers.
MAX_QUOTA = 10**12
_FORM = f"each API key must be given as KEY or KEY:QUOTA, QUOTA a whole number from 1 to {MAX_QUOTA:,}"


def parse_quota(text: str) -> int:
    """A quota: ASCII digits only, 1 to MAX_QUOTA (a longer number is refused before int() reads it)."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_QUOTA)):
        raise KeySetupError(_FORM)
    quota = int(text)
    if not 1 <= quota <= MAX_QUOTA:
        raise KeySetupError(_FORM)
    return quota


def parse_api_keys(specs: list[str]) -> dict[str, int | None]:
    """``KEY`` (no quota) or ``KEY:QUOTA`` each -> {key: quota}; one form only, so ``K:5:6`` (a key
    with a colon, or a quota typed twice?) is refused rather than read one way without a word."""
    keys: dict[str, int | None] = {}
    for spec in specs:
        key, sep, text = spec.partition(":")
        quota = parse_quota(text) if sep else None
        if not key or any(c.isspace() for c in key):
            raise KeySetupError("an API key must be non-empty and without spaces")
        if key in keys and keys[key] != quota:
            raise KeySetupError("an API key is given twice with different quotas")
        keys[key] = quota
    return keys


def parse_key_outputs(specs: list[str]) -> dict[str, list[str]]:
    """``KEY=OUTPUT[,OUTPUT...]`` each -> {key: outputs it may read} (a key not named reads all)."""
    chosen: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, outputs = spec.partition("=")
        names = [o.strip() for o in outputs.split(",") if o.strip()]
        if not sep or not key or not names:
            raise KeySetupError("each --key-outputs must be KEY=OUTPUT[,OUTPUT...], for example"
                                " KEY=probabilities")
        if key in chosen:
            raise KeySetupError("a key is given twice in --key-outputs")
        chosen[key] = names
    return chosen


def read_key_file(path: str | Path) -> list[str]:
    """The key specs in ``path``: one a line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise KeySetupError(f"cannot read the API key file {path}: {reason}") from None
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def server_keys(specs: list[str], key_file: str | Path | None = None,
                environ: dict[str, str] | None = None) -> dict[str, int | None]:
    """The server's keys from the command line, the key file and ``B2KD_SERVE_KEYS`` together."""
    env = (os.environ if environ is None else environ).get(KEYS_ENV, "")
    from_env = env.replace(",", " ").split()
    from_file = read_key_file(key_file) if key_file else []
    return parse_api_keys([*specs, *from_file, *from_env])


def load_secret(path: str | Path, create: bool = True) -> bytes:
    """The secret in ``path``; created (random, mode 0600) if absent and ``create``.

    Creation is atomic (a complete temporary file linked into place), so server
    processes starting side by side on one directory end with one secret.
    """
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(SECRET_BYTES) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process was first: use its secret
        finally:
            tmp.unlink()
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise KeySetupError(f"cannot read the key secret {path}: {exc.strerror or exc}") from None
    if len(secret) < 16:
        raise KeySetupError(f"the key secret {path} is too short: give at least 16 characters")
    return secret


def key_id(key: str, secret: bytes) -> str:
    """What the server stores and logs instead of a key: a keyed hash of it."""
    return "k-" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16]


def legacy_key_id(key: str) -> str:
    """The unsalted id earlier versions wrote (kept only to carry a store's usage over)."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def secret_check(secret: bytes) -> str:
    """A fingerprint of the secret, kept in the store to catch a server started with another one."""
    return hmac.new(secret, _CHECK, hashlib.sha256).hexdigest()[:16]
