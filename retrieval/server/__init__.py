"""The reference HTTP service over :class:`retrieval.Retriever` (FastAPI).

- :mod:`~retrieval.server.app`: the routes (``create_app``, ``app_from_env``);
- :mod:`~retrieval.server.schemas`: request and response models (the OpenAPI contract);
- :mod:`~retrieval.server.metrics`: Prometheus series and the request middleware;
- :mod:`~retrieval.server.store`: the durable state (events and the change log) in the
  state directory, shared by worker processes;
- :mod:`~retrieval.server.state`: the served Retriever, rebuilt from that log;
- :mod:`~retrieval.server.auth`, :mod:`~retrieval.server.limits`,
  :mod:`~retrieval.server.bundles`, :mod:`~retrieval.server.access`: tokens, body and
  concurrency limits, the bundle root, access logs.
"""

from retrieval.server.app import app_from_env, create_app, tcp_listener

__all__ = ["app_from_env", "create_app", "tcp_listener"]
