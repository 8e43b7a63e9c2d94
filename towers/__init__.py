"""twotower training side: data, towers, training, evaluation and export.

Sub-modules are imported on demand; ``import towers`` itself is cheap.
"""

__version__ = "0.1.0"
