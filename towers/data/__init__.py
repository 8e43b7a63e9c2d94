"""Input tables: schema and validation, readers, synthetic data, splits, samples, loaders."""

from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, RawData

__all__ = ["ITEM_ID", "TIMESTAMP", "USER_ID", "WEIGHT", "RawData"]
