"""Typed specifications of the model: what the inputs look like (:class:`TowerSpec`, from
the fitted encoders) and how the towers and the loss are configured (:class:`TowerConfig`,
:class:`LossConfig`, both read from the ``model`` config group by
:meth:`ModelConfig.from_config`, the one way config reaches the model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twotower.encoding import EntityEncoder, FeatureEncoders, MultiHotEncoder


@dataclass
class EntitySpec:
    """Sizes of one entity's inputs (see :class:`twotower.encoding.EntityEncoder`)."""

    prefix: str
    id_size: int
    use_id: bool
    categorical_sizes: list[int] = field(default_factory=list)
    bag_sizes: list[int] = field(default_factory=list)
    bag_widths: list[int] = field(default_factory=list)
    n_numeric: int = 0

    @classmethod
    def from_encoder(cls, encoder: EntityEncoder) -> EntitySpec:
        return cls(
            prefix=encoder.prefix,
            id_size=encoder.ids.size,
            use_id=encoder.use_id,
            categorical_sizes=[v.size for v in encoder.categorical.values()],
            bag_sizes=[
                b.vocabulary.size if isinstance(b, MultiHotEncoder) else b.size
                for b in encoder.bags
            ],
            bag_widths=[b.max_tokens for b in encoder.bags],
            n_numeric=len(encoder.numeric),
        )


@dataclass
class TowerSpec:
    """Everything the towers need to know about the inputs; plain data, saved in checkpoints."""

    items: EntitySpec
    users: EntitySpec
    history_length: int

    @classmethod
    def from_encoders(cls, encoders: FeatureEncoders) -> TowerSpec:
        return cls(
            EntitySpec.from_encoder(encoders.items),
            EntitySpec.from_encoder(encoders.users),
            encoders.history_length,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TowerSpec:
        return cls(
            EntitySpec(**data["items"]), EntitySpec(**data["users"]), int(data["history_length"])
        )


@dataclass
class TowerShape:
    """MLP shape shared by both towers."""

    hidden: Sequence[int] = (128,)
    output_dim: int = 64
    dropout: float = 0.0
    norm: str = "none"


@dataclass
class TowerConfig:
    """How the towers are built (``model.*`` keys of the config; see conf/model)."""

    embedding_dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [128])
    output_dim: int = 64
    dropout: float = 0.0
    norm: str = "none"
    share_item_embedding: bool = True
    history_pooling: str = "mean"
    sparse_embeddings: bool = False
    item_id_dropout: float = 0.0
    attribute_init: str = "normal"
    ensemble: int = 1
    history_attributes: bool = False

    @property
    def shape(self) -> TowerShape:
        return TowerShape(list(self.hidden), self.output_dim, self.dropout, self.norm)


@dataclass
class LossConfig:
    """The sampled-softmax loss (``model.*`` keys of the config)."""

    temperature: float = 0.1
    learn_temperature: bool = False
    logq_correction: bool = True
    logq_weight: float = 1.0
    remove_accidental_hits: bool = True


@dataclass
class ModelConfig:
    """The whole ``model`` config group, typed: towers, loss, negatives, optimiser."""

    towers: TowerConfig = field(default_factory=TowerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # extra negatives per batch drawn uniformly from items seen in training (datamodule)
    mixed_negatives: int = 0
    # factories: optimizer(params=...) and scheduler(optimizer=...), built by Hydra
    optimizer: Any = None
    scheduler: Any = None
    scheduler_interval: str = "epoch"

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> ModelConfig:
        """Split the flat ``model`` group into the typed parts; an unknown key is an error
        (a misspelt knob never goes unnoticed). ``optimizer`` / ``scheduler`` are built
        with ``hydra.utils.instantiate`` (partial factories)."""
        values = dict(model)
        values.pop("_target_", None)
        tower_keys = {f.name for f in dataclasses.fields(TowerConfig)}
        loss_keys = {f.name for f in dataclasses.fields(LossConfig)}
        rest = {"mixed_negatives", "optimizer", "scheduler", "scheduler_interval"}
        unknown = sorted(set(values) - tower_keys - loss_keys - rest)
        if unknown:
            raise ValueError(
                f"unknown model setting(s) {unknown}; known: "
                f"{sorted(tower_keys | loss_keys | rest)}"
            )
        towers = {k: v for k, v in values.items() if k in tower_keys}
        if "hidden" in towers:
            towers["hidden"] = [int(w) for w in towers["hidden"]]
        factories = {}
        for name in ("optimizer", "scheduler"):
            spec = values.get(name)
            if spec is not None and not callable(spec):
                import hydra

                spec = hydra.utils.instantiate(spec)
            factories[name] = spec
        return cls(
            towers=TowerConfig(**towers),
            loss=LossConfig(**{k: v for k, v in values.items() if k in loss_keys}),
            mixed_negatives=int(values.get("mixed_negatives", 0)),
            scheduler_interval=str(values.get("scheduler_interval", "epoch")),
            **factories,
        )
