"""Errors of the steering package (advisor, service)."""

from __future__ import annotations

__all__ = ["AdvisorError", "ControlsConflict", "FollowError", "SteeringError"]


class SteeringError(Exception):
    """Base class of the steering package's errors (the CLI prints them, exit code 2)."""


class AdvisorError(SteeringError, ValueError):
    """Bad input to the advisor: an empty or unreachable candidate range, coverages of
    the wrong shape, an unusable estimate, a bad control of the advisor (an excluded range
    that is empty or off the goniometer, a forced angle out of range, a bad target)."""


class ControlsConflict(AdvisorError):
    """A control of the advisor that contradicts those already set (a forced angle in an
    excluded range, an excluded range over the forced angle): clear the other first."""


class FollowError(SteeringError, ValueError):
    """A message on ``<prefix>_folded`` or ``<prefix>_estimates`` that the follower of the
    model-server replicas (:mod:`steering.follow`) cannot use; it is dead-lettered."""
