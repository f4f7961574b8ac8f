"""Kafka settings of the service: the run topics of a prefix and the broker's security.

A run is published on four topics of an instrument prefix (:func:`topics_for`); the
connection to a secured facility broker is set with ``STEER_KAFKA_*`` environment variables
(:func:`client_security`), and every Kafka client of the service is made with those.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from consumers.exceptions import ConsumerError

__all__ = ["END_OFFSETS_MAX_AGE_S", "SECURITY_ENV", "SUFFIXES", "client_security", "topics_for"]

#: Topic suffixes of an instrument prefix.
SUFFIXES = ("runInfo", "motion", "events", "bluesky")
#: :meth:`consumers.kafka.KafkaSource.caught_up` trusts the end offsets it fetched for this
#: long (s)
END_OFFSETS_MAX_AGE_S = 2.0


def topics_for(prefix: str) -> list[str]:
    """The run topics of an instrument prefix, e.g. ``arcs_events``."""
    return [f"{prefix}_{s}" for s in SUFFIXES]


#: environment variables of the broker connection's security -> kafka-python settings
SECURITY_ENV = {
    "STEER_KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "STEER_KAFKA_SSL_CAFILE": "ssl_cafile",
    "STEER_KAFKA_SSL_CERTFILE": "ssl_certfile",
    "STEER_KAFKA_SSL_KEYFILE": "ssl_keyfile",
    "STEER_KAFKA_SSL_PASSWORD": "ssl_password",
    "STEER_KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "STEER_KAFKA_SASL_USERNAME": "sasl_plain_username",
    "STEER_KAFKA_SASL_PASSWORD": "sasl_plain_password",
}
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def client_security(env: dict[str, str] | None = None) -> dict[str, Any]:
    """kafka-python settings of a secured facility broker, from ``STEER_KAFKA_*`` variables.

    ``STEER_KAFKA_SECURITY_PROTOCOL`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL; default
    PLAINTEXT), ``STEER_KAFKA_SSL_CAFILE`` / ``_CERTFILE`` / ``_KEYFILE`` / ``_PASSWORD`` (TLS,
    client certificates optional), ``STEER_KAFKA_SASL_MECHANISM`` (PLAIN, SCRAM-SHA-256,
    SCRAM-SHA-512), ``STEER_KAFKA_SASL_USERNAME`` and ``STEER_KAFKA_SASL_PASSWORD`` (or
    ``STEER_KAFKA_SASL_PASSWORD_FILE``, e.g. a mounted secret). Every Kafka client of the
    service is made with these. Raises :class:`ConsumerError` for an inconsistent set.
    """
    env = dict(os.environ if env is None else env)
    out = _settings_from(env)
    protocol = str(out.get("security_protocol", "PLAINTEXT")).upper()
    if protocol not in _PROTOCOLS:
        raise ConsumerError(
            f"STEER_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(_PROTOCOLS)}, "
            f"got {protocol!r}"
        )
    out["security_protocol"] = protocol
    if protocol.startswith("SASL"):
        _check_sasl(protocol, out)
    elif "sasl_mechanism" in out:
        raise ConsumerError(
            f"STEER_KAFKA_SASL_MECHANISM is set but the protocol is {protocol}: "
            "set STEER_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)"
        )
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if key in out and not Path(out[key]).is_file():
            var = next(v for v, k in SECURITY_ENV.items() if k == key)
            raise ConsumerError(f"{var}: no such file {out[key]}")
    if protocol == "PLAINTEXT":
        return {"security_protocol": "PLAINTEXT"}
    return out


def _settings_from(env: dict[str, str]) -> dict[str, Any]:
    """The kafka-python settings named by the set variables (the password file read)."""
    out: dict[str, Any] = {}
    for var, key in SECURITY_ENV.items():
        value = env.get(var, "").strip()
        if value:
            out[key] = value
    pw_file = env.get("STEER_KAFKA_SASL_PASSWORD_FILE", "").strip()
    if pw_file and "sasl_plain_password" not in out:
        try:
            out["sasl_plain_password"] = Path(pw_file).read_text().strip()
        except OSError as exc:
            raise ConsumerError(f"STEER_KAFKA_SASL_PASSWORD_FILE {pw_file}: {exc}") from exc
    return out


def _check_sasl(protocol: str, out: dict[str, Any]) -> None:
    """Check (and upper-case) the SASL mechanism and require the user name and password."""
    mech = str(out.get("sasl_mechanism", "")).upper()
    if mech not in _MECHANISMS:
        raise ConsumerError(
            f"{protocol} needs STEER_KAFKA_SASL_MECHANISM, one of {', '.join(_MECHANISMS)}"
            + (f" (got {mech!r})" if mech else "")
        )
    out["sasl_mechanism"] = mech
    missing = [
        v
        for v, k in (
            ("STEER_KAFKA_SASL_USERNAME", "sasl_plain_username"),
            ("STEER_KAFKA_SASL_PASSWORD", "sasl_plain_password"),
        )
        if not out.get(k)
    ]
    if missing:
        raise ConsumerError(f"{protocol} needs {' and '.join(missing)}")
