"""The reference HTTP service over :class:`retrieval.Retriever` (FastAPI).

- :mod:`~retrieval.server.app`: the routes (``create_app``, ``app_from_env``);
- :mod:`~retrieval.server.schemas`: request and response models (the OpenAPI contract);
- :mod:`~retrieval.server.metrics`: Prometheus series and the request middleware;
- :mod:`~retrieval.server.state`: the served Retriever, swapped on reload;
- :mod:`~retrieval.server.history`, :mod:`~retrieval.server.shared`: the event store and
  the change feed shared by worker processes.
"""

from retrieval.server.app import app_from_env, create_app, tcp_listener

__all__ = ["app_from_env", "create_app", "tcp_listener"]
