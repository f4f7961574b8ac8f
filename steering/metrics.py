"""Prometheus metrics of the model server and the advisor (served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, Info

__all__ = [
    "ADVISOR_SECONDS",
    "CHUNK_TO_ESTIMATE_SECONDS",
    "CHUNK_TO_REFINED_SECONDS",
    "ESTIMATES_SKIPPED",
    "ESTIMATES_SUPERSEDED",
    "ESTIMATE_SECONDS",
    "MODEL_INFO",
    "PREDICTIONS",
    "QUEUE_SUBMISSIONS",
    "REFINE_FALLBACKS",
    "REFINE_SCANS",
    "REFINE_SECONDS",
    "REQUESTS_REFUSED",
]

_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

ESTIMATE_SECONDS = Histogram(
    "steer_estimate_seconds", "Model-server estimate of one snapshot", buckets=_BUCKETS
)
REFINE_SECONDS = Histogram(
    "steer_refine_seconds",
    "Likelihood refinement of one snapshot (the running estimate)",
    buckets=_BUCKETS,
)
REFINE_FALLBACKS = Counter(
    "steer_refine_fallbacks_total",
    "Snapshots whose running estimate fell back to the VAE (refinement failed or did not converge)",
)
REFINE_SCANS = Counter(
    "steer_refine_scans_total",
    "Background jobs of the refinement by kind: grid (a scan of a fit's grid of starts) or "
    "start (a recheck's fit from the VAE's start alone); and by outcome: started, skipped "
    "(one was running), found (a lower minimum), none (no lower one), adopted (the next "
    "snapshot's fit ended there)",
    ["kind", "outcome"],
)
ADVISOR_SECONDS = Histogram(
    "steer_advisor_seconds", "Advisor ranking after one estimate", buckets=_BUCKETS
)
CHUNK_TO_ESTIMATE_SECONDS = Histogram(
    "steer_chunk_to_estimate_seconds",
    "From an orientation's close to its estimate in the run history (fold, checkpoint, "
    "estimate, advice)",
    buckets=_BUCKETS,
)
CHUNK_TO_REFINED_SECONDS = Histogram(
    "steer_chunk_to_refined_seconds",
    "From an orientation's close to the first refined estimate that includes it (a "
    "superseded snapshot's orientations wait for the newer snapshot's fit)",
    buckets=_BUCKETS,
)
ESTIMATES_SUPERSEDED = Counter(
    "steer_estimates_superseded_total",
    "Snapshots given the VAE's estimate alone because a newer snapshot of the run was "
    "already waiting (the estimates were behind the consumer); the newer one is refined",
)
ESTIMATES_SKIPPED = Counter(
    "steer_estimates_skipped_total",
    "Completed orientations not estimated (model unavailable, powder run)",
    ["reason"],
)
MODEL_INFO = Info("steer_model", "The frozen model in use")

PREDICTIONS = Counter(
    "steer_predictions_total",
    "POST /predict requests that reached the prediction pool, by outcome: ok, invalid (4xx "
    "from the physics checks), failed, queue_full (429), timed_out, client_gone, "
    "worker_lost, stopping",
    ["outcome"],
)
QUEUE_SUBMISSIONS = Counter(
    "steer_queue_submissions_total",
    "Advice handed to the bluesky-queueserver queue sink, by outcome: added, replaced, "
    "duplicate, withdrawn, skipped, rejected, unreachable, superseded",
    ["outcome"],
)
REQUESTS_REFUSED = Counter(
    "steer_requests_refused_total",
    "Requests refused by a limit before any work: body, omegas, cif_sites, "
    "advisor_candidates, streams",
    ["limit"],
)
