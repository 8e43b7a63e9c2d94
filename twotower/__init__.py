"""twotower: two-tower retrieval. This package is the torch-free ground floor shared by
training (:mod:`towers`) and serving (:mod:`retrieval`): the feature encoders
(:mod:`twotower.encoding`), the error types (:mod:`twotower.errors`), the bundle format
(:mod:`twotower.bundle`), and the ``twotower`` command (:mod:`twotower.cli`)."""

from importlib import metadata

try:
    __version__ = metadata.version("twotower")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
