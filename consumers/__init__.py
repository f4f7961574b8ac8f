"""Streaming ingestion: from facility messages to folded spectra.

* :mod:`consumers.messages` -- the seam: :class:`~consumers.messages.SourceMessage` and the
  :class:`~consumers.messages.MessageSource` / :class:`~consumers.messages.SnapshotSink`
  Protocols that the core is written against.
* :mod:`consumers.reduction` -- the transport-neutral core: fold table and kernels, coverage
  and its cache, accumulation, orientation segmentation, and the pipeline (decode ->
  segment -> fold -> accumulate) shared by the live consumer and the offline fold.
* :mod:`consumers.wire` -- ev44/f144/pl72/6s4t decoding.
* Adapters: :mod:`consumers.kafka` (broker, source, sinks, consumer groups),
  :mod:`consumers.zmq` (bluesky documents over 0MQ), :mod:`consumers.replay` (record and
  replay of runs).
* :mod:`consumers.service` -- the checkpointed live consumer; :mod:`consumers.offline` -- the
  offline fold of a recorded run.

Imports only :mod:`simulations` below it; see ``docs/architecture.md``.
"""
