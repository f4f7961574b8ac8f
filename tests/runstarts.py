"""Run starts rewritten for tests: a pl72 with its private metadata, its nexus_structure, or
both, as different producers would send it."""

from __future__ import annotations

from streaming_data_types.run_start_pl72 import deserialise_pl72, serialise_pl72

__all__ = ["pl72_with"]


def pl72_with(payload: bytes, *, metadata: bool = True, nexus: bool = True) -> bytes:
    """``payload`` (a pl72) with only the ``metadata`` and/or ``nexus_structure`` kept."""
    run = deserialise_pl72(payload)
    return bytes(
        serialise_pl72(
            job_id=run.job_id,
            filename=run.filename,
            start_time=run.start_time,
            run_name=run.run_name,
            instrument_name=run.instrument_name,
            metadata=run.metadata if metadata else "",
            nexus_structure=run.nexus_structure if nexus else "",
        )
    )
