"""Recorded runs (.steer): round trip, metadata, streaming, and every way a file can be bad."""

from __future__ import annotations

import gzip
import io
import random
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from simulations.exceptions import RecordingError, SimulationError
from simulations.runs.recording import (
    MAGIC,
    RecordedMessage,
    RunReader,
    RunWriter,
    read_run,
    write_run,
)

TOPICS = ("bifrost_detector", "bifrost_motion", "bifrost_runInfo", "bluesky", "ü-topic")


def random_messages(n: int, seed: int = 7, max_payload: int = 300) -> list[RecordedMessage]:
    """Deterministic messages with None and empty keys, 0-3 headers, empty payloads."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        key_kind = r.random()
        key = None if key_kind < 0.3 else b"" if key_kind < 0.4 else r.randbytes(r.randint(1, 16))
        headers = tuple(
            (r.choice(("schema", "trace-id", "é")), r.randbytes(r.randint(0, 8)))
            for _ in range(r.randint(0, 3))
        )
        out.append(
            RecordedMessage(
                topic=r.choice(TOPICS),
                key=key,
                timestamp_ns=r.randint(-(2**63), 2**63 - 1),
                headers=headers,
                payload=r.randbytes(r.randint(0, max_payload)),
            )
        )
    return out


@pytest.fixture
def run_file(tmp_path: Path) -> tuple[Path, list[RecordedMessage]]:
    msgs = random_messages(50)
    path = tmp_path / "run.steer"
    write_run(path, msgs, metadata={"run_id": "r1"})
    return path, msgs


def test_round_trip_keeps_every_field_and_order(tmp_path: Path) -> None:
    msgs = random_messages(3000)
    path = tmp_path / "run.steer"
    meta = {"run_id": "abc", "instrument": "BIFROST", "omega_deg": [0.0, 1.5], "n": None}
    assert write_run(path, msgs, metadata=meta) == 3000
    assert list(read_run(path)) == msgs
    with RunReader(path) as reader:
        assert reader.metadata == meta
        assert reader.version == 1
        assert reader.count() == 3000
        assert list(reader) == msgs  # a reader can be iterated again


def test_writer_counts_and_n_bytes_is_decompressed_size(tmp_path: Path) -> None:
    msgs = random_messages(200)
    path = tmp_path / "run.steer"
    with RunWriter(path, metadata={"a": 1}, compresslevel=1) as writer:
        writer.write(msgs[0])
        assert writer.write_many(msgs[1:]) == 199
        assert writer.n_messages == 200
    assert writer.closed
    with gzip.open(path, "rb") as f:
        assert len(f.read()) == writer.n_bytes


def test_metadata_is_read_from_the_header_alone(run_file: tuple[Path, list]) -> None:
    path, _ = run_file
    raw = path.read_bytes()
    with RunReader(io.BytesIO(raw)) as reader:  # a stream: position shows what was read
        assert reader.metadata == {"run_id": "r1"}
    # The same header with the body cut off entirely: metadata still reads.
    with gzip.open(path, "rb") as f:
        body = f.read()
    (header_len,) = struct.unpack_from("<I", body, 10)
    header_only = gzip.compress(body[: 14 + header_len])
    with RunReader(io.BytesIO(header_only)) as reader:
        assert reader.metadata == {"run_id": "r1"}
        with pytest.raises(RecordingError, match="truncated"):
            reader.count()


def test_reading_the_first_message_does_not_read_the_file(tmp_path: Path) -> None:
    # Random payloads do not compress: about 8 MB on disk.
    msgs = random_messages(2000, max_payload=8000)
    path = tmp_path / "big.steer"
    write_run(path, msgs)
    size = path.stat().st_size
    assert size > 4_000_000
    with path.open("rb") as f, RunReader(f) as reader:
        assert next(iter(reader)) == msgs[0]
        # gzip reads the compressed file in small pieces (8 KiB on CPython 3.11, measured).
        assert f.tell() < 1_000_000 < size


def test_streaming_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.steer"
    write_run(path, random_messages(1500, max_payload=8000))  # ~6 MB decompressed
    tracemalloc.start()
    try:
        with RunReader(path) as reader:
            n = sum(len(m.payload) for m in reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n > 5_000_000
    # Peak is the gzip/zlib buffers plus one message, not the file (measured ~0.1 MB).
    assert peak < 2_000_000


def test_zcat_compatible(run_file: tuple[Path, list]) -> None:
    path, _ = run_file
    with gzip.open(path, "rb") as f:
        content = f.read()
    assert content.startswith(MAGIC + struct.pack("<H", 1))
    assert content.endswith(struct.pack("<I", 0))
    zcat = shutil.which("zcat")
    if zcat is not None:
        out = subprocess.run([zcat, str(path)], capture_output=True, check=True).stdout
        assert out == content


def test_byte_layout_of_one_record(tmp_path: Path) -> None:
    msg = RecordedMessage(
        topic="t", key=None, timestamp_ns=5, headers=(("h", b"v"),), payload=b"xyz"
    )
    path = tmp_path / "one.steer"
    write_run(path, [msg])
    with gzip.open(path, "rb") as f:
        content = f.read()
    (header_len,) = struct.unpack_from("<I", content, 10)
    record = content[14 + header_len :]
    expected = (
        struct.pack("<H", 1) + b"t" + struct.pack("<i", -1) + struct.pack("<q", 5)
        + struct.pack("<H", 1) + struct.pack("<H", 1) + b"h" + struct.pack("<I", 1) + b"v"
        + struct.pack("<I", 3) + b"xyz"
    )  # fmt: skip
    assert record == struct.pack("<I", len(expected)) + expected + struct.pack("<I", 0)


@pytest.mark.parametrize("cut", [1, 12, 200, 2000])
def test_truncated_file_is_detected(run_file: tuple[Path, list], tmp_path: Path, cut: int) -> None:
    path, _ = run_file
    raw = path.read_bytes()
    bad = tmp_path / "cut.steer"
    bad.write_bytes(raw[:-cut])
    with RunReader(bad) as reader, pytest.raises(RecordingError, match=r"cut\.steer is truncated"):
        reader.count()


def test_missing_end_marker_is_truncation_with_record_count(
    run_file: tuple[Path, list], tmp_path: Path
) -> None:
    path, msgs = run_file
    with gzip.open(path, "rb") as f:
        content = f.read()
    bad = tmp_path / "no_end.steer"
    bad.write_bytes(gzip.compress(content[:-4]))  # a valid gzip stream, no end marker
    got = []
    with pytest.raises(RecordingError, match="after 50 complete records, without the end marker"):
        got.extend(read_run(bad))
    assert got == msgs  # everything before the cut was still delivered


def test_writer_left_by_an_exception_leaves_a_truncated_run(tmp_path: Path) -> None:
    path = tmp_path / "crashed.steer"
    msgs = random_messages(3)

    def record_then_crash() -> None:
        with RunWriter(path) as writer:
            writer.write_many(msgs)
            raise RuntimeError("consumer died")

    with pytest.raises(RuntimeError, match="consumer died"):
        record_then_crash()
    with pytest.raises(RecordingError, match="after 3 complete records"):
        list(read_run(path))


def test_cut_mid_record_names_the_record(run_file: tuple[Path, list], tmp_path: Path) -> None:
    path, _ = run_file
    with gzip.open(path, "rb") as f:
        content = f.read()
    bad = tmp_path / "mid.steer"
    (header_len,) = struct.unpack_from("<I", content, 10)
    (first_len,) = struct.unpack_from("<I", content, 14 + header_len)
    bad.write_bytes(gzip.compress(content[: 14 + header_len + 4 + first_len + 10]))
    with pytest.raises(RecordingError, match=r"record 1 at decompressed byte \d+"):
        list(read_run(bad))


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "other.steer"
    bad.write_bytes(gzip.compress(b"NOTARUN!" + struct.pack("<HI", 1, 2) + b"{}"))
    with pytest.raises(RecordingError, match=r"other\.steer is not a recorded run"):
        RunReader(bad)


def test_only_the_magic_is_a_truncated_run(tmp_path: Path) -> None:
    """A gzip holding the magic and nothing more starts with it: it is cut off."""
    bad = tmp_path / "cut.steer"
    bad.write_bytes(gzip.compress(b"STEERRUN"))
    with pytest.raises(RecordingError, match=r"cut\.steer is a truncated recorded run") as err:
        RunReader(bad)
    assert "does not start with" not in str(err.value)


def test_not_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "plain.steer"
    bad.write_bytes(b"STEERRUN not compressed")
    with pytest.raises(RecordingError, match="not a gzip stream"):
        RunReader(bad)


def test_unsupported_version(tmp_path: Path) -> None:
    bad = tmp_path / "v9.steer"
    bad.write_bytes(gzip.compress(MAGIC + struct.pack("<HI", 9, 2) + b"{}"))
    with pytest.raises(RecordingError, match="format version 9"):
        RunReader(bad)


def test_data_after_end_marker(run_file: tuple[Path, list], tmp_path: Path) -> None:
    path, _ = run_file
    with gzip.open(path, "rb") as f:
        content = f.read()
    bad = tmp_path / "extra.steer"
    bad.write_bytes(gzip.compress(content + b"\x00"))
    with pytest.raises(RecordingError, match="data follows the end marker"):
        RunReader(bad).count()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="no such file"):
        RunReader(tmp_path / "absent.steer")
    assert issubclass(RecordingError, SimulationError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"topic": "x" * 65536}, "topic is 65536 bytes"),
        ({"headers": (("h" * 70000, b""),)}, "header 0 name is 70000 bytes"),
        ({"timestamp_ns": 2**63}, "does not fit in int64"),
        ({"payload": "text"}, "payload must be bytes"),
        ({"key": "text"}, "key must be bytes"),
    ],
)
def test_message_that_does_not_fit_is_refused(
    tmp_path: Path, change: dict[str, object], match: str
) -> None:
    fields: dict = {"topic": "t", "key": None, "timestamp_ns": 0, "payload": b""} | change
    with RunWriter(tmp_path / "x.steer") as writer:
        with pytest.raises(RecordingError, match=match):
            writer.write(RecordedMessage(**fields))
        assert writer.n_messages == 0
    assert list(read_run(tmp_path / "x.steer")) == []  # nothing of it was written


def test_bad_metadata_and_closed_writer(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="reserved"):
        RunWriter(tmp_path / "a.steer", metadata={"version": 2})
    with pytest.raises(RecordingError, match="not JSON-serialisable"):
        RunWriter(tmp_path / "b.steer", metadata={"x": object()})
    writer = RunWriter(tmp_path / "c.steer")
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(RecordingError, match="closed"):
        writer.write(RecordedMessage(topic="t", key=None, timestamp_ns=0, payload=b""))


def test_same_messages_give_the_same_bytes(tmp_path: Path) -> None:
    msgs = random_messages(20)
    write_run(tmp_path / "a.steer", msgs, {"k": 1})
    write_run(tmp_path / "b.steer", msgs, {"k": 1})
    assert (tmp_path / "a.steer").read_bytes() == (tmp_path / "b.steer").read_bytes()
