"""The HTTP API: the FastAPI application and its parts.

* :mod:`~steering.api.app`: :func:`~steering.api.app.create_app`, wiring only;
* :mod:`~steering.api.runs`, :mod:`~steering.api.live`, :mod:`~steering.api.predict`: one
  router per resource;
* :mod:`~steering.api.schemas`: the request and answer models of the OpenAPI document;
* :mod:`~steering.api.state`: :class:`~steering.api.state.LiveState`, what the service
  shares with the routes; :mod:`~steering.api.deps`: how the routes get it;
* :mod:`~steering.api.spectra`, :mod:`~steering.api.errors`: the spectrum's JSON and PNG
  answers, the validation-error answer.
"""
