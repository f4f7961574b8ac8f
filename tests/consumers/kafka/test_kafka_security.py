"""Secured facility brokers: the STEER_KAFKA_* settings (TLS, SASL PLAIN / SCRAM) are checked
and reach the Kafka clients as configured.

What is not exercised here: a TLS or SCRAM handshake with a secured broker. The embedded
broker (Tansu 0.6, memory storage) has ``--cert/--key/--authentication`` options but no way
found to register SCRAM users in it, and no other broker runs on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.exceptions import ConsumerError
from consumers.kafka import client_security


def test_plaintext_by_default() -> None:
    assert client_security({}) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_with_scram(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    pw = tmp_path / "password"
    pw.write_text("s3cret\n")
    cfg = client_security(
        {
            "STEER_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "STEER_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "STEER_KAFKA_SASL_USERNAME": "steer",
            "STEER_KAFKA_SASL_PASSWORD_FILE": str(pw),
            "STEER_KAFKA_SSL_CAFILE": str(ca),
        }
    )
    assert cfg == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "steer",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": str(ca),
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STEER_KAFKA_SECURITY_PROTOCOL": "TLS"}, "must be one of PLAINTEXT, SSL"),
        ({"STEER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs STEER_KAFKA_SASL_MECHANISM"),
        (
            {
                "STEER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "STEER_KAFKA_SASL_MECHANISM": "GSSAPI",
            },
            "got 'GSSAPI'",
        ),
        (
            {
                "STEER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "STEER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                "STEER_KAFKA_SASL_USERNAME": "steer",
            },
            "needs STEER_KAFKA_SASL_PASSWORD",
        ),
        ({"STEER_KAFKA_SASL_MECHANISM": "PLAIN"}, "the protocol is PLAINTEXT"),
        (
            {"STEER_KAFKA_SECURITY_PROTOCOL": "SSL", "STEER_KAFKA_SSL_CAFILE": "/nope/ca.pem"},
            "STEER_KAFKA_SSL_CAFILE: no such file",
        ),
    ],
)
def test_inconsistent_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConsumerError, match=message):
        client_security(env)


def test_settings_reach_a_real_client(tmp_path: Path) -> None:
    """kafka-python accepts and keeps them (a client made with a fixed API version does
    not connect until it is used)."""
    from kafka import KafkaConsumer, KafkaProducer

    env = {
        "STEER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STEER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "STEER_KAFKA_SASL_USERNAME": "steer",
        "STEER_KAFKA_SASL_PASSWORD": "pw",
    }
    cfg = client_security(env)
    for cls in (KafkaConsumer, KafkaProducer):
        client = cls(bootstrap_servers="127.0.0.1:9", api_version=(3, 9), **cfg)
        try:
            for key, value in cfg.items():
                assert client.config[key] == value
        finally:
            client.close()


def test_cli_says_what_is_wrong(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "STEER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STEER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "steering.cli", "consume", "--bootstrap", "127.0.0.1:9",
         "--prefix", "x", "--state-dir", str(tmp_path / "s")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "needs STEER_KAFKA_SASL_USERNAME and STEER_KAFKA_SASL_PASSWORD" in proc.stderr
    assert "Traceback" not in proc.stderr
