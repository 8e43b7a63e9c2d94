"""The bundle's layout: file names, reserved table columns, format version and metric.

Every reader and writer of a bundle takes its names from here.
"""

from __future__ import annotations

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
USER_TOWER = "user_tower.onnx"
ITEM_TOWER = "item_tower.onnx"
INDEX = "items.faiss"
ITEMS = "items.parquet"
USERS = "users.parquet"
ENCODERS = "encoders.json"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
USER_EMBEDDINGS = "user_embeddings.parquet"
# a tower's large weights (an id table of millions of rows), beside its graph as ONNX
# external data, which onnxruntime maps from the file instead of copying into memory
WEIGHTS_SUFFIX = ".data"
TOWER_WEIGHTS = (USER_TOWER + WEIGHTS_SUFFIX, ITEM_TOWER + WEIGHTS_SUFFIX)
METRIC = "inner_product"
REQUIRED_FILES = (USER_TOWER, ITEM_TOWER, INDEX, ITEMS, USERS, ENCODERS, ITEM_EMBEDDINGS)
OPTIONAL_FILES = (USER_EMBEDDINGS, *TOWER_WEIGHTS)

USER_ID = "user_id"
ITEM_ID = "item_id"
# reserved columns of items.parquet / users.parquet
COUNT_COLUMN = "_twotower_train_count"
HISTORY_COLUMN = "_twotower_history"
SEEN_COLUMN = "_twotower_seen"
REMOVED_COLUMN = "_twotower_removed"
RESERVED_PREFIX = "_twotower"
