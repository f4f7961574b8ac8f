"""The advisor: ranks the orientations to measure next, the closed-loop benchmark of
strategies, the bluesky-adaptive agent, and the way into the control system: the advice
read (:mod:`steering.advisor.advice`), the bluesky plans (:mod:`steering.advisor.plans`)
and the bluesky-queueserver queue sink (:mod:`steering.advisor.queueserver`).
"""
