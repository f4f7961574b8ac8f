"""Run history in a real database: runs, FC estimates, advice, model versions, and the
controls of each run's advisor with the log of who changed them
(:class:`steering.advisor.controls.AdvisorControls`).

SQLite file by default, any SQLAlchemy URL by setting (``STEER_DATABASE_URL``; PostgreSQL in
``deploy/``). The service writes here as runs progress and the API reads from here, so the
history survives a restart of the service.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = ["History"]


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class _Base(DeclarativeBase):
    pass


class RunRow(_Base):
    __tablename__ = "runs"
    run_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    material: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(20), default="running")
    started_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    n_orientations: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    export_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)


#: The keys of an estimate that the history returns (``/runs/{id}/estimates``): the
#: running estimate (``fc``, from ``source``: ``refined`` or ``vae``), both estimators'
#: results and why the refinement did not stand, when it did not.
_ESTIMATE_KEYS = (
    "fc",
    "units",
    "ood",
    "source",
    "vae",
    "refined",
    "fallback",
    "scan",
    "superseded_by",
    "amended",
    "exact_correction",
)


class EstimateRow(_Base):
    __tablename__ = "estimates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    n_orientations: Mapped[int] = mapped_column(Integer)
    omega: Mapped[float] = mapped_column(Float)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    model_version: Mapped[str] = mapped_column(String(200))
    estimate: Mapped[dict[str, Any]] = mapped_column(JSON)
    out_of_domain: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)


class AdviceRow(_Base):
    __tablename__ = "advice"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    n_orientations: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    ranking: Mapped[dict[str, Any]] = mapped_column(JSON)


class ControlsRow(_Base):
    """A run's advisor controls (:meth:`AdvisorControls.state`), the latest only."""

    __tablename__ = "advisor_controls"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class OverrideRow(_Base):
    """One change of a run's advisor controls: what, to what, who, when."""

    __tablename__ = "advisor_overrides"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id"), index=True)
    action: Mapped[str] = mapped_column(String(40))
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    who: Mapped[str | None] = mapped_column(String(200), nullable=True)
    at: Mapped[str] = mapped_column(String(40))


class ModelRow(_Base):
    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(200), primary_key=True)
    material: Mapped[str] = mapped_column(String(100))
    path: Mapped[str] = mapped_column(String(1000))
    loaded_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


def _iso(t: _dt.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:  # SQLite drops the zone; we store UTC
        t = t.replace(tzinfo=_dt.UTC)
    return t.isoformat()


class History:
    """The service's history store.

    Parameters
    ----------
    url
        SQLAlchemy URL (``sqlite:///steer.db`` ...). Tables are created when missing.
    """

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
        self.url = url
        self.engine = create_engine(url, **kwargs)
        _Base.metadata.create_all(self.engine)
        self._lock = threading.Lock()  # SQLite writes from the consumer and API threads

    # -- writes ------------------------------------------------------------------------------

    def upsert_run(
        self,
        run_id: str,
        *,
        material: str,
        state: str | None = None,
        n_orientations: int | None = None,
        summary: dict[str, Any] | None = None,
        export_path: str | None = None,
    ) -> None:
        """Create or update a run."""
        with self._lock, Session(self.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            if row is None:
                row = RunRow(run_id=run_id, material=material, summary={})
                s.add(row)
            if state is not None:
                row.state = state
            if n_orientations is not None:
                row.n_orientations = n_orientations
            if summary is not None:
                row.summary = summary
            if export_path is not None:
                row.export_path = export_path
            row.updated_at = _now()

    def add_estimate(
        self,
        run_id: str,
        *,
        n_orientations: int,
        omega: float,
        estimate: dict[str, Any],
        latency_s: float = 0.0,
    ) -> None:
        """Record an FC estimate (``Estimate.to_dict()``) after ``n_orientations``."""
        with self._lock, Session(self.engine) as s, s.begin():
            s.add(
                EstimateRow(
                    run_id=run_id,
                    n_orientations=n_orientations,
                    omega=omega,
                    model_version=str(estimate.get("model_version", "")),
                    estimate=estimate,
                    out_of_domain=bool(estimate.get("out_of_domain", False)),
                    latency_s=latency_s,
                )
            )

    def add_advice(self, run_id: str, *, n_orientations: int, ranking: dict[str, Any]) -> None:
        """Record the advisor's ranking after ``n_orientations``."""
        with self._lock, Session(self.engine) as s, s.begin():
            s.add(AdviceRow(run_id=run_id, n_orientations=n_orientations, ranking=ranking))

    def amend_advice(self, run_id: str, *, n_orientations: int, ranking: dict[str, Any]) -> None:
        """Replace the run's latest advice after ``n_orientations`` (added when there is
        none): the last advice of a run planned at its end
        (:meth:`steering.loop.SteeringLoop.finish`)."""
        with self._lock, Session(self.engine) as s, s.begin():
            row = s.scalars(
                select(AdviceRow)
                .where(AdviceRow.run_id == run_id, AdviceRow.n_orientations == n_orientations)
                .order_by(AdviceRow.id.desc())
                .limit(1)
            ).first()
            if row is None:
                s.add(AdviceRow(run_id=run_id, n_orientations=n_orientations, ranking=ranking))
            else:
                row.ranking = dict(ranking)

    def save_controls(
        self, run_id: str, state: dict[str, Any], override: dict[str, Any] | None = None
    ) -> None:
        """Keep a run's advisor controls ``state`` (:meth:`AdvisorControls.state`) and append
        ``override`` (``{"action", "value", "who", "at"}``) to its log, in one transaction.
        """
        with self._lock, Session(self.engine) as s, s.begin():
            row = s.get(ControlsRow, run_id)
            if row is None:
                s.add(ControlsRow(run_id=run_id, state=dict(state)))
            else:
                row.state = dict(state)
                row.updated_at = _now()
            if override is not None:
                s.add(
                    OverrideRow(
                        run_id=run_id,
                        action=str(override["action"]),
                        value=override.get("value"),
                        who=override.get("who"),
                        at=str(override["at"]),
                    )
                )

    def add_model(self, version: str, *, material: str, path: str) -> None:
        """Record that a model version was loaded."""
        with self._lock, Session(self.engine) as s, s.begin():
            if s.get(ModelRow, version) is None:
                s.add(ModelRow(version=version, material=material, path=path))

    # -- reads -------------------------------------------------------------------------------

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(RunRow).order_by(RunRow.started_at.desc())).all()
            return [self._run(r) for r in rows]

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run, or None."""
        with Session(self.engine) as s:
            row = s.get(RunRow, run_id)
            return None if row is None else self._run(row)

    def estimates(self, run_id: str) -> list[dict[str, Any]]:
        """The run's estimate history, oldest first."""
        with Session(self.engine) as s:
            rows: Sequence[EstimateRow] = s.scalars(
                select(EstimateRow).where(EstimateRow.run_id == run_id).order_by(EstimateRow.id)
            ).all()
            return [
                {
                    "n_orientations": r.n_orientations,
                    "omega": r.omega,
                    "created_at": _iso(r.created_at),
                    "model_version": r.model_version,
                    "out_of_domain": r.out_of_domain,
                    "latency_s": r.latency_s,
                    **{k: v for k, v in r.estimate.items() if k in _ESTIMATE_KEYS},
                }
                for r in rows
            ]

    def advice(self, run_id: str, *, latest: bool = True) -> list[dict[str, Any]]:
        """The run's advice (the latest only, by default), newest last."""
        with Session(self.engine) as s:
            q = select(AdviceRow).where(AdviceRow.run_id == run_id).order_by(AdviceRow.id)
            rows = s.scalars(q).all()
            rows = rows[-1:] if latest else rows
            return [
                {
                    "n_orientations": r.n_orientations,
                    "created_at": _iso(r.created_at),
                    **r.ranking,
                }
                for r in rows
            ]

    def load_controls(self, run_id: str) -> dict[str, Any] | None:
        """A run's advisor controls with their whole override log (oldest first), or None
        when none were set (:meth:`AdvisorControls.from_dict` reads it)."""
        with Session(self.engine) as s:
            row = s.get(ControlsRow, run_id)
            if row is None:
                return None
            log = s.scalars(
                select(OverrideRow).where(OverrideRow.run_id == run_id).order_by(OverrideRow.id)
            ).all()
            return {
                **row.state,
                "overrides": [
                    {"action": o.action, "value": o.value, "who": o.who, "at": o.at} for o in log
                ],
            }

    def models(self) -> list[dict[str, Any]]:
        """Model versions loaded so far, newest first."""
        with Session(self.engine) as s:
            rows = s.scalars(select(ModelRow).order_by(ModelRow.loaded_at.desc())).all()
            return [
                {
                    "version": r.version,
                    "material": r.material,
                    "path": r.path,
                    "loaded_at": _iso(r.loaded_at),
                }
                for r in rows
            ]

    @staticmethod
    def _run(r: RunRow) -> dict[str, Any]:
        return {
            "run_id": r.run_id,
            "material": r.material,
            "state": r.state,
            "started_at": _iso(r.started_at),
            "updated_at": _iso(r.updated_at),
            "n_orientations": r.n_orientations,
            "summary": r.summary,
            "export_path": r.export_path,
        }
