"""steering: the running service on top of the consumers and the model server.

Sub-packages:

* :mod:`steering.advisor`: ranks the goniometer angles to measure next
  (:class:`steering.advisor.ranking.Advisor`), the closed-loop benchmark of strategies
  (:mod:`steering.advisor.closedloop`) and the bluesky-adaptive agent
  (:mod:`steering.advisor.agent`);
* :mod:`steering.api`: the HTTP API (FastAPI): :func:`steering.api.app.create_app` wires
  one router per resource (runs, the live service, ``POST /predict``), the schemas and the
  state shared with the service (:class:`steering.api.state.LiveState`);
* :mod:`steering.cli`: the ``steer`` command, one module per command group.

Modules:

* :mod:`steering.service`: :class:`~steering.service.SteeringService`, the consumer, the
  loop, the run history and the live state on a thread;
* :mod:`steering.loop`: the live loop (snapshot -> estimate -> advice) and its seams
  (:class:`~steering.loop.Estimator`, advice sinks);
* :mod:`steering.db`: the run history (SQLAlchemy);
* :mod:`steering.figures`: the live page's figures;
* :mod:`steering.demo`: ``steer demo``, the whole service on a simulated run;
* :mod:`steering.metrics`, :mod:`steering.exceptions`.

The layers inside the package and the data path are described in ``docs/architecture.md``.
"""
