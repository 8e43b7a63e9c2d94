"""Feature encoding, written once: raw table values -> integer / float model inputs.

The encoders are fitted on training data by ``towers``, saved in the bundle as plain
JSON, and applied by this same numpy/pandas code at training time and at serving
time, so the two can never disagree. Nothing here imports torch.

- :mod:`twotower.encoding.vocabulary`: :class:`Vocabulary` and the index conventions
  (``0`` padding, ``1`` out-of-vocabulary, known values from ``2``);
- :mod:`twotower.encoding.columns`: multi-hot bags, hashed text, numbers;
- :mod:`twotower.encoding.entity`: one entity's encoder, and :class:`FeatureEncoders`.
"""

from twotower.encoding.columns import (
    NUMERIC_CLIP,
    HashedTextEncoder,
    MultiHotEncoder,
    NumericEncoder,
)
from twotower.encoding.entity import (
    ENCODERS_FORMAT,
    ITEM_INPUTS,
    USER_INPUTS,
    EntityEncoder,
    FeatureColumns,
    FeatureEncoders,
    seen_rows,
)
from twotower.encoding.vocabulary import (
    FIRST_KNOWN_INDEX,
    OOV_INDEX,
    PAD_INDEX,
    Vocabulary,
    split_tokens,
    words_of,
)

__all__ = [
    "ENCODERS_FORMAT",
    "FIRST_KNOWN_INDEX",
    "ITEM_INPUTS",
    "NUMERIC_CLIP",
    "OOV_INDEX",
    "PAD_INDEX",
    "USER_INPUTS",
    "EntityEncoder",
    "FeatureColumns",
    "FeatureEncoders",
    "HashedTextEncoder",
    "MultiHotEncoder",
    "NumericEncoder",
    "Vocabulary",
    "seen_rows",
    "split_tokens",
    "words_of",
]
