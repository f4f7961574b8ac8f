"""Which stream is which: an instrument's (topic, source name) pairs mapped to roles.

A facility instrument publishes on topics and with source names of its own: the simulator
of this project on ``<prefix>_runInfo``, ``_motion`` (sources ``omega``,
``omega_setpoint``, ``proton_charge``), ``_events``, ``_monitor`` and ``_bluesky``; an
ESS instrument on ``<instrument>_filewriter`` (run start and stop), ``_detector``,
``_beam_monitor`` and ``_motion`` with EPICS-like source names. The consumers never name
a topic or a source: they ask an :class:`InstrumentConfig` for the role of what arrived.

Roles (:data:`ROLES`):

``detector``
    ev44 detector events, folded.
``monitor``
    ev44 beam-monitor events, counted per orientation (the monitor's exposure).
``goniometer``
    f144 readback of the rotation angle (degrees) that segments the run into orientations.
``goniometer_setpoint``
    f144 setpoint of that angle (a move has started).
``proton_charge``
    f144 charge per pulse (uC).
``run_control``
    pl72 run start and 6s4t run stop.
``bluesky``
    bluesky documents (JSON with the project's header, or bluesky-kafka's msgpack).
``log``
    f144 logs the service reads but does not use (sample environment, other motors): a
    topic to subscribe to whose goniometer or charge source the run start names.

A config is a TOML or YAML file (:func:`load_instrument_config`); topic names may use
``{prefix}``, filled in from the command line's ``--prefix``. ``source = "*"`` matches any
source on the topic; an exact (topic, source) rule wins over a wildcard. A source on a
mapped topic that no rule names is counted (:class:`StreamTally`), never fatal. When the
config names no goniometer stream, the run start names it (the simulator's
``goniometer.source_name``, or the f144 stream that drives the rotation in a
``nexus_structure``).

Normalisation: ``normalisation = "proton_charge"`` (the default) weights each
orientation's exposure by its proton charge; ``"monitor"`` by its counts in the beam
monitor ``monitor`` (a source name; default: the first monitor the config or the run start
names exactly). A run whose config and run start name no monitor is refused at its run
start. Both quantities are recorded per orientation whichever is used.

Two presets ship with the package (:data:`PRESETS`): ``simulator`` (the project's own
simulated instrument, the default) and ``ess`` (ESS topic naming; the rotation stream and
the charge come from the run start or a config that names them).

Example (``deploy/instruments/ess_example.toml``)::

    name = "bifrost"
    prefix = "bifrost"
    keyed_by_run = false

    [[streams]]
    topic = "{prefix}_filewriter"
    role = "run_control"

    [[streams]]
    topic = "{prefix}_detector"
    role = "detector"

    [[streams]]
    topic = "{prefix}_motion"
    source = "BIFROST-SpRot:MC-Rz-01:Mtr.RBV"
    role = "goniometer"
"""

from __future__ import annotations

import logging
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from consumers.exceptions import ConsumerError

__all__ = [
    "PRESETS",
    "ROLES",
    "InstrumentConfig",
    "StreamRule",
    "StreamTally",
    "load_instrument_config",
    "preset",
]

logger = logging.getLogger(__name__)

Role = Literal[
    "detector",
    "monitor",
    "goniometer",
    "goniometer_setpoint",
    "proton_charge",
    "run_control",
    "bluesky",
    "log",
]
#: every role a stream can have
ROLES: tuple[str, ...] = Role.__args__  # type: ignore[attr-defined]
#: roles whose messages carry no source name to tell streams apart (whole topics)
_TOPIC_ROLES = ("run_control", "bluesky")
#: roles that must name their f144 source exactly (a wildcard would take every log)
_EXACT_ROLES = ("goniometer", "goniometer_setpoint", "proton_charge")


class StreamRule(BaseModel):
    """One mapping: messages on ``topic`` from ``source`` (``"*"``: any) have ``role``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str = Field(min_length=1, description="Kafka topic; may contain {prefix}")
    source: str = Field(default="*", min_length=1, description="source name, or * for any")
    role: Role

    @model_validator(mode="after")
    def _check(self) -> StreamRule:
        if self.role in _TOPIC_ROLES and self.source != "*":
            raise ValueError(f"a {self.role} stream is a whole topic: leave out 'source'")
        if self.role in _EXACT_ROLES and self.source == "*":
            raise ValueError(
                f"a {self.role} stream must name its f144 source (a wildcard would take every "
                "log on the topic)"
            )
        return self


class InstrumentConfig(BaseModel):
    """An instrument's streams: its topics, and the role of each (topic, source) pair.

    Attributes
    ----------
    name
        The instrument (for logs and the page).
    prefix
        Fills ``{prefix}`` in topic names; also the prefix of the service's own output
        topics (``<prefix>_folded``, ``_deadletter``, ``_advice``, ...).
    keyed_by_run
        The producer keys every message with its run id (the simulator does; an ESS
        instrument does not): messages keyed with another run's id are then held or
        refused. Off, message keys are ignored.
    streams
        The rules; at least one ``run_control`` topic and one ``detector`` stream.
    normalisation
        The exposure weight of an orientation: ``"proton_charge"`` (uC; I in
        1/(uC sr meV)) or ``"monitor"`` (counts of the beam monitor ``monitor``; I in
        counts per monitor count, 1/(sr meV)).
    monitor
        The monitor source of ``"monitor"`` normalisation (None: the first monitor named
        exactly by the config or the run start).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    prefix: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    keyed_by_run: bool = False
    streams: tuple[StreamRule, ...]
    normalisation: Literal["proton_charge", "monitor"] = "proton_charge"
    monitor: str | None = Field(default=None, min_length=1)
    _lut: dict[tuple[str, str], str] = PrivateAttr(default_factory=dict)
    _by_src: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> InstrumentConfig:
        roles = {r.role for r in self.streams}
        missing = [r for r in ("run_control", "detector") if r not in roles]
        if missing:
            raise ValueError(f"no {' and no '.join(missing)} stream: a run cannot be folded")
        seen: dict[tuple[str, str], str] = {}
        for r in self.streams:
            key = (r.topic, r.source)
            if key in seen and seen[key] != r.role:
                raise ValueError(
                    f"topic {r.topic!r} source {r.source!r} is mapped twice ({seen[key]} and "
                    f"{r.role})"
                )
            seen[key] = r.role
        if self.monitor is not None and self._by_source_rules().get(self.monitor) not in (
            None,
            "monitor",
        ):
            raise ValueError(
                f"monitor {self.monitor!r} is mapped to role "
                f"{self._by_source_rules()[self.monitor]}, not monitor: name a monitor source"
            )
        return self

    def _by_source_rules(self) -> dict[str, str]:
        return {r.source: r.role for r in self.streams if r.source != "*"}

    def normalisation_monitor(self, named: Sequence[str] = ()) -> str | None:
        """The monitor source that ``"monitor"`` normalisation weights by, or None for
        ``"proton_charge"``; ``named``: the monitor sources the run start names.

        Raises
        ------
        ConsumerError
            With ``"monitor"`` normalisation when no monitor can be chosen: the config
            names none and maps no monitor stream, or maps only wildcard ones.
        """
        if self.normalisation == "proton_charge":
            return None
        named = [*(s for _, s in self.sources("monitor") if s != "*"), *named]
        if self.monitor is not None and (named or self.sources("monitor")):
            return self.monitor
        if self.monitor is None and named:
            return named[0]
        raise ConsumerError(
            f"instrument {self.name}: normalisation = 'monitor' but "
            + (
                f"no stream carries monitor {self.monitor!r}"
                if self.monitor is not None
                else "neither the config nor the run start names a beam monitor source"
            )
            + ': add a [[streams]] rule with role = "monitor" and its source (and '
            'monitor = SOURCE), or set normalisation = "proton_charge"'
        )

    # -- queries --------------------------------------------------------------------------

    def topic(self, rule: StreamRule) -> str:
        """The rule's topic with ``{prefix}`` filled in."""
        return rule.topic.replace("{prefix}", self.prefix)

    def topics(self, *, bluesky: bool = True) -> list[str]:
        """Every topic to read, in the config's order, each once (``bluesky=False`` leaves
        out the bluesky topics, when the documents come over 0MQ)."""
        out: dict[str, None] = {}
        for r in self.streams:
            if bluesky or r.role != "bluesky":
                out[self.topic(r)] = None
        return list(out)

    def role(self, topic: str, source: str) -> str | None:
        """The role of a message from ``source`` on ``topic``, or None when no rule names it.

        An exact rule wins over a wildcard. ``topic=""`` (a caller that does not know the
        topic, e.g. a recorded file from before topics were kept) matches by source only.
        """
        return (
            self._lookup().get((topic, source))
            or self._lookup().get((topic, "*"))
            or (self._by_source().get(source) if not topic else None)
        )

    def topic_role(self, topic: str) -> str | None:
        """The role of a whole topic (``run_control``, ``bluesky``) or None."""
        return self._lookup().get((topic, "*")) if topic else None

    def sources(self, role: str) -> list[tuple[str, str]]:
        """The (topic, source) pairs of a role (source ``*`` for a wildcard)."""
        return [(self.topic(r), r.source) for r in self.streams if r.role == role]

    def with_run_start(
        self, named: dict[str, list[tuple[str, str]]], *, beside: bool = False
    ) -> InstrumentConfig:
        """This config with the streams a run start names (``{role: [(topic, source)]}``)
        added for every role the config itself maps nowhere (``beside``: for every role,
        beside the config's own rules): the run start says which f144 source drives the
        rotation, which carries the charge, which ev44 sources are monitors. A source named
        without a topic goes on the config's f144 log topic."""
        added = []
        for role, pairs in named.items():
            if role not in ROLES or (self.sources(role) and not beside):
                continue
            for topic, source in pairs:
                if source and source not in self._by_src:
                    added.append(
                        StreamRule(topic=topic or self._log_topic(), source=source, role=role)  # type: ignore[arg-type]
                    )
        if not added:
            return self
        return InstrumentConfig.model_validate(
            {**self.model_dump(), "streams": (*self.streams, *added)}
        )

    def _log_topic(self) -> str:
        """The topic of the config's f144 logs (its first goniometer, set-point or charge
        rule), for a source a run start names without a topic."""
        for r in self.streams:
            if r.role in (*_EXACT_ROLES, "log"):
                return r.topic
        raise ConsumerError(
            f"instrument {self.name}: the run start names an f144 source but not its topic, "
            "and the config maps no f144 log topic to take it from"
        )

    def model_post_init(self, context: Any, /) -> None:
        self._lut = {(self.topic(r), r.source): r.role for r in self.streams}
        self._by_src = {r.source: r.role for r in self.streams if r.source != "*"}

    def _lookup(self) -> dict[tuple[str, str], str]:
        return self._lut

    def _by_source(self) -> dict[str, str]:
        return self._by_src

    def to_toml(self) -> str:
        """The config as TOML text (``{prefix}`` kept in topic names)."""
        lines = [
            f"name = {_q(self.name)}",
            f"prefix = {_q(self.prefix)}",
            f"keyed_by_run = {'true' if self.keyed_by_run else 'false'}",
            f"normalisation = {_q(self.normalisation)}",
        ]
        if self.monitor is not None:
            lines.append(f"monitor = {_q(self.monitor)}")
        for r in self.streams:
            lines += ["", "[[streams]]", f"topic = {_q(r.topic)}"]
            if r.source != "*":
                lines.append(f"source = {_q(r.source)}")
            lines.append(f"role = {_q(r.role)}")
        return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    """A TOML basic string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rules(*rows: tuple[str, str, str]) -> tuple[StreamRule, ...]:
    return tuple(StreamRule(topic=t, source=s, role=r) for t, s, r in rows)  # type: ignore[arg-type]


def _simulator(prefix: str) -> InstrumentConfig:
    return InstrumentConfig(
        name=prefix,
        prefix=prefix,
        keyed_by_run=True,
        streams=_rules(
            ("{prefix}_runInfo", "*", "run_control"),
            ("{prefix}_events", "*", "detector"),
            ("{prefix}_motion", "omega", "goniometer"),
            ("{prefix}_motion", "omega_setpoint", "goniometer_setpoint"),
            ("{prefix}_motion", "proton_charge", "proton_charge"),
            ("{prefix}_monitor", "*", "monitor"),
            ("{prefix}_bluesky", "*", "bluesky"),
        ),
    )


def _ess(prefix: str) -> InstrumentConfig:
    return InstrumentConfig(
        name=prefix,
        prefix=prefix,
        keyed_by_run=False,
        streams=_rules(
            ("{prefix}_filewriter", "*", "run_control"),
            ("{prefix}_detector", "*", "detector"),
            ("{prefix}_beam_monitor", "*", "monitor"),
            ("{prefix}_motion", "*", "log"),
            ("{prefix}_bluesky", "*", "bluesky"),
        ),
    )


#: the shipped presets: name -> (prefix -> config)
PRESETS = {"simulator": _simulator, "ess": _ess}


def preset(name: str, prefix: str, **settings: Any) -> InstrumentConfig:
    """A shipped preset (:data:`PRESETS`) for the instrument ``prefix``; ``settings``
    (``normalisation``, ``monitor``) replace the preset's."""
    try:
        config = PRESETS[name](prefix)
    except KeyError:
        raise ConsumerError(
            f"no instrument-config preset {name!r}; presets: {', '.join(PRESETS)} (or give a "
            "TOML/YAML file)"
        ) from None
    if not settings:
        return config
    return InstrumentConfig.model_validate({**config.model_dump(), **settings})


def load_instrument_config(spec: str | Path, *, prefix: str | None = None) -> InstrumentConfig:
    """An instrument config from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, or a
    preset's name (``simulator``, ``ess``).

    ``prefix`` (the command line's ``--prefix``) fills in a file's ``prefix`` when the file
    has none (a file that names its own keeps it), and a preset's (default ``arcs``).

    Raises
    ------
    ConsumerError
        For a file that cannot be read or parsed, or a config that fails validation (the
        message lists each problem with its place in the file).
    """
    text = str(spec)
    if text in PRESETS:
        return preset(text, prefix or "arcs")
    path = Path(text)
    try:
        raw_text = path.read_text()
    except OSError as exc:
        raise ConsumerError(
            f"instrument config {path}: {exc.strerror or exc}; give a TOML or YAML file or a "
            f"preset ({', '.join(PRESETS)})"
        ) from exc
    data = _parse(path, raw_text)
    if prefix and "prefix" not in data:
        data["prefix"] = prefix
    try:
        return InstrumentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConsumerError(f"instrument config {path}: {problems}") from exc


def _parse(path: Path, text: str) -> dict[str, Any]:
    """The file's mapping (TOML or YAML by suffix)."""
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = tomllib.loads(text)
    except Exception as exc:
        raise ConsumerError(f"instrument config {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConsumerError(f"instrument config {path}: expected a mapping at the top level")
    return data


class StreamTally:
    """Counts of what arrived per (topic, source), and of sources no rule maps.

    :meth:`warnings` names the config's streams that never appeared, with what was seen
    on their topics, so that a misspelt source name is found from the log.
    """

    def __init__(self, config: InstrumentConfig, *, warn_missing: bool = True) -> None:
        self.config = config
        #: :meth:`warnings` names configured streams that never appeared (off for the
        #: default mapping by source name, whose streams are only a guess)
        self.warn_missing = warn_missing
        self.seen: Counter[tuple[str, str]] = Counter()
        self.unmapped: Counter[tuple[str, str]] = Counter()

    def count(self, topic: str, source: str, role: str | None) -> None:
        """Count one message (``role`` None: no rule maps it)."""
        self.seen[(topic, source)] += 1
        if role is None:
            if (topic, source) not in self.unmapped:
                logger.info(
                    "instrument %s: source %r on %s is not in the config; counted and skipped",
                    self.config.name,
                    source,
                    topic or "(no topic)",
                )
            self.unmapped[(topic, source)] += 1

    def missing(self) -> list[tuple[str, str, str]]:
        """(topic, source, role) of the config's exact streams that have not appeared."""
        out: list[tuple[str, str, str]] = []
        if not self.warn_missing:
            return out
        seen_topics = {t for t, _ in self.seen}
        seen_pairs = set(self.seen)
        for r in self.config.streams:
            topic = self.config.topic(r)
            if r.role in _TOPIC_ROLES or r.source == "*":
                continue
            if (topic, r.source) not in seen_pairs and not (
                "" in seen_topics and ("", r.source) in seen_pairs
            ):
                out.append((topic, r.source, r.role))
        return out

    def warnings(self) -> list[str]:
        """One line per configured source that never appeared, with the sources seen on
        its topic."""
        lines = []
        for topic, source, role in self.missing():
            others = sorted({s for t, s in self.seen if t == topic})
            there = f"sources seen there: {', '.join(others)}" if others else "nothing seen there"
            lines.append(f"{role} source {source!r} on {topic} never appeared; {there}")
        return lines

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts: ``unmapped`` {"topic/source": n} and ``never_seen`` lines."""
        return {
            "unmapped": {f"{t}/{s}": n for (t, s), n in sorted(self.unmapped.items())},
            "never_seen": self.warnings(),
        }
