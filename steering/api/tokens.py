"""The API's bearer tokens, each with a name (who made a change).

``STEER_API_TOKEN`` is the token named ``default``; ``STEER_API_TOKENS="alice:tok1,bob:tok2"``
adds named ones (``name:token`` pairs, comma-separated), so that the record of a change
(:mod:`steering.api.controls`) says who made it. :func:`token_table` joins both;
:func:`steering.api.deps.require_token` answers with the name of the token presented.
This module imports no web framework.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from steering.exceptions import SteeringError

__all__ = ["DEFAULT_NAME", "parse_tokens", "token_table"]

#: The name of ``STEER_API_TOKEN``.
DEFAULT_NAME = "default"

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def parse_tokens(raw: str | None, variable: str = "STEER_API_TOKENS") -> dict[str, str]:
    """Named tokens of ``"alice:tok1,bob:tok2"`` as {name: token}.

    Raises
    ------
    SteeringError
        A pair without ``:``, a name that is not 1 to 64 letters, digits or ``_.@-``, an
        empty token, or a name or token given twice (the message names ``variable``).
    """
    out: dict[str, str] = {}
    if raw is None or not raw.strip():
        return out
    for pair in raw.split(","):
        pair = pair.strip()
        if not pair:
            continue
        name, sep, token = pair.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise SteeringError(
                f"{variable}: {name or pair!r} has no token; give name:token pairs, "
                'e.g. "alice:tok1,bob:tok2"'
            )
        if not _NAME.match(name):
            raise SteeringError(
                f"{variable}: the name {name!r} must be 1 to 64 letters, digits or _.@-"
            )
        if name in out:
            raise SteeringError(f"{variable}: the name {name!r} is given twice")
        if token in out.values():
            raise SteeringError(f"{variable}: two names share one token; give each its own")
        out[name] = token
    return out


def token_table(token: str | None, tokens: Mapping[str, str] | None = None) -> dict[str, str]:
    """{name: token} of the single token (named :data:`DEFAULT_NAME`) and the named ones.

    Raises
    ------
    SteeringError
        A named token called ``default`` beside ``STEER_API_TOKEN``, or the same token
        under two names.
    """
    table = dict(tokens or {})
    if token:
        if DEFAULT_NAME in table and table[DEFAULT_NAME] != token:
            raise SteeringError(
                f"STEER_API_TOKENS names a token {DEFAULT_NAME!r}, the name of STEER_API_TOKEN: "
                "rename it"
            )
        if any(t == token for n, t in table.items() if n != DEFAULT_NAME):
            raise SteeringError("STEER_API_TOKEN is also a named token in STEER_API_TOKENS")
        table[DEFAULT_NAME] = token
    return table
