"""The user tower and the item tower: embeddings of ids and attributes -> MLP -> unit vectors.

Both towers take a dict of named input tensors, the names and layout produced by
:class:`retrieval.encoding.FeatureEncoders`; the sizes come from :class:`TowerSpec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from retrieval.encoding import PAD_INDEX, EntityEncoder, FeatureEncoders


@dataclass
class EntitySpec:
    """Sizes of one entity's inputs (see :class:`retrieval.encoding.EntityEncoder`)."""

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
            bag_sizes=[b.vocabulary.size for b in encoder.multi_hot.values()],
            bag_widths=[b.max_tokens for b in encoder.multi_hot.values()],
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


def masked_mean(embedded: Tensor, tokens: Tensor) -> Tensor:
    """Mean of ``embedded`` (B, T, d) over positions whose token is not padding."""
    mask = (tokens != PAD_INDEX).unsqueeze(-1).to(embedded.dtype)
    return (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class AttributeEmbedder(nn.Module):
    """Categorical, multi-hot (mean-pooled bag per column) and numeric attributes -> one vector."""

    def __init__(self, spec: EntitySpec, dim: int) -> None:
        super().__init__()
        self.prefix = spec.prefix
        self.categorical = nn.ModuleList(
            nn.Embedding(size, dim, padding_idx=PAD_INDEX) for size in spec.categorical_sizes
        )
        self.bags = nn.ModuleList(
            nn.Embedding(size, dim, padding_idx=PAD_INDEX) for size in spec.bag_sizes
        )
        self.bag_widths = list(spec.bag_widths)
        self.numeric = nn.Linear(spec.n_numeric, dim) if spec.n_numeric else None
        self.out_dim = dim * (len(self.categorical) + len(self.bags) + (1 if self.numeric else 0))

    def forward(self, inputs: dict[str, Tensor]) -> list[Tensor]:
        parts: list[Tensor] = []
        if len(self.categorical):
            cats = inputs[f"{self.prefix}_cat"]
            parts += [emb(cats[:, i]) for i, emb in enumerate(self.categorical)]
        if len(self.bags):
            tokens = torch.split(inputs[f"{self.prefix}_bag"], self.bag_widths, dim=1)
            parts += [masked_mean(emb(t), t) for emb, t in zip(self.bags, tokens, strict=True)]
        if self.numeric is not None:
            parts.append(self.numeric(inputs[f"{self.prefix}_num"]))
        return parts


class ItemTower(nn.Module):
    """Item id embedding (shared with the user history) + attributes -> MLP -> unit vector."""

    def __init__(
        self,
        spec: EntitySpec,
        item_embedding: nn.Embedding,
        hidden: Sequence[int],
        dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.use_id = spec.use_id
        self.item_embedding = item_embedding
        self.attributes = AttributeEmbedder(spec, item_embedding.embedding_dim)
        in_dim = self.attributes.out_dim + (item_embedding.embedding_dim if self.use_id else 0)
        self.mlp = mlp(max(in_dim, 1), hidden, dim, dropout)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        parts = self.attributes(inputs)
        if self.use_id:
            parts.insert(0, self.item_embedding(inputs["item_id"]))
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class UserTower(nn.Module):
    """Optional user id + attributes + mean of recent item embeddings -> MLP -> unit vector."""

    def __init__(
        self,
        spec: EntitySpec,
        item_embedding: nn.Embedding,
        embedding_dim: int,
        hidden: Sequence[int],
        dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.use_id = spec.use_id
        self.user_embedding = (
            nn.Embedding(spec.id_size, embedding_dim, padding_idx=PAD_INDEX)
            if self.use_id
            else None
        )
        self.item_embedding = item_embedding
        self.attributes = AttributeEmbedder(spec, embedding_dim)
        in_dim = self.attributes.out_dim + item_embedding.embedding_dim
        in_dim += embedding_dim if self.use_id else 0
        self.mlp = mlp(in_dim, hidden, dim, dropout)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        history = inputs["history"]
        parts = [masked_mean(self.item_embedding(history), history), *self.attributes(inputs)]
        if self.user_embedding is not None:
            parts.insert(0, self.user_embedding(inputs["user_id"]))
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class TwoTowerModel(nn.Module):
    """The user and item towers, sharing the item id embedding table."""

    def __init__(
        self,
        spec: TowerSpec,
        embedding_dim: int = 64,
        hidden: Sequence[int] = (128,),
        output_dim: int = 64,
        dropout: float = 0.0,
        share_item_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.spec = spec
        item_embedding = nn.Embedding(spec.items.id_size, embedding_dim, padding_idx=PAD_INDEX)
        history_embedding = (
            item_embedding
            if share_item_embedding
            else nn.Embedding(spec.items.id_size, embedding_dim, padding_idx=PAD_INDEX)
        )
        self.item_tower = ItemTower(spec.items, item_embedding, hidden, output_dim, dropout)
        self.user_tower = UserTower(
            spec.users, history_embedding, embedding_dim, hidden, output_dim, dropout
        )
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.05)
                with torch.no_grad():
                    module.weight[PAD_INDEX].zero_()


class PositionalTower(nn.Module):
    """Wraps a tower so it takes positional tensors in ``input_names`` order (for ONNX)."""

    def __init__(self, tower: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.tower = tower
        self.input_names = list(input_names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.tower(dict(zip(self.input_names, tensors, strict=True)))
