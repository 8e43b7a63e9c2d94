"""twotower serving side: load a bundle and answer nearest-neighbour queries.

Depends on numpy, pandas, faiss and onnxruntime only; it never imports torch.
``Retriever`` is imported lazily so that ``twotower.encoding`` stays cheap to import.
"""

from typing import TYPE_CHECKING, Any

from twotower.errors import BundleError, RequestError, TwoTowerError

if TYPE_CHECKING:
    from retrieval.retriever import Retriever

__all__ = ["BundleError", "RequestError", "Retriever", "TwoTowerError"]


def __getattr__(name: str) -> Any:
    if name == "Retriever":
        from retrieval.retriever import Retriever

        return Retriever
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
