"""The user tower and the item tower: embeddings of ids and attributes -> MLP -> unit vectors.

Both towers take a dict of named input tensors, the names and layout produced by
:class:`twotower.encoding.FeatureEncoders`; the sizes come from :class:`TowerSpec`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from towers.model.spec import EntitySpec, TowerConfig, TowerShape, TowerSpec
from twotower.encoding import OOV_INDEX, PAD_INDEX

__all__ = ["EntitySpec", "TowerConfig", "TowerShape", "TowerSpec", "TwoTowerModel"]


def masked_mean(embedded: Tensor, tokens: Tensor) -> Tensor:
    """Mean of ``embedded`` (B, T, d) over positions whose token is not padding."""
    mask = (tokens != PAD_INDEX).unsqueeze(-1).to(embedded.dtype)
    return (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


NORMS = ("none", "layer", "batch")
POOLINGS = ("mean", "recency", "attention", "recency+mean")
ATTRIBUTE_INITS = ("normal", "zeros")


def mlp(
    in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float, norm: str = "none"
) -> nn.Sequential:
    """Linear -> [norm] -> ReLU -> [dropout] per hidden width, then a final Linear."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if norm == "layer":
            layers.append(nn.LayerNorm(width))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class HistoryPooling(nn.Module):
    """Pools the embeddings of a left-padded history (most recent item last).

    ``mean``: plain average. ``recency``: softmax over a learned weight per position
    from the end. ``attention``: softmax over a learned score of each item's embedding
    plus the recency weight. ``recency+mean``: the recency view and the plain average side
    by side (a short- and a long-term view; twice the width). Padding never receives
    weight; an empty history gives 0.
    """

    def __init__(self, mode: str, length: int, dim: int) -> None:
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"history_pooling must be one of {POOLINGS}, got {mode!r}")
        self.mode = mode
        self.out_dim = 2 * dim if mode == "recency+mean" else dim
        self.position_logits = nn.Parameter(torch.zeros(max(length, 1))) if mode != "mean" else None
        self.scorer = (
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))
            if mode == "attention"
            else None
        )

    def forward(self, embedded: Tensor, tokens: Tensor) -> Tensor:
        if self.position_logits is None:
            return masked_mean(embedded, tokens)
        valid = tokens != PAD_INDEX
        logits = self.position_logits[: tokens.shape[1]].unsqueeze(0).expand_as(tokens)
        if self.scorer is not None:
            logits = logits + self.scorer(embedded).squeeze(-1)
        logits = logits.masked_fill(~valid, -1e9)
        weights = torch.softmax(logits, dim=1) * valid.to(embedded.dtype)
        pooled = (embedded * weights.unsqueeze(-1)).sum(dim=1)
        if self.mode == "recency+mean":
            return torch.cat([pooled, masked_mean(embedded, tokens)], dim=-1)
        return pooled


def embedding(size: int, dim: int, sparse: bool) -> nn.Embedding:
    return nn.Embedding(size, dim, padding_idx=PAD_INDEX, sparse=sparse)


class AttributeEmbedder(nn.Module):
    """Categorical, bag (multi-hot or hashed text, mean-pooled per column) and numeric
    attributes -> a list of d-dimensional parts."""

    def __init__(self, spec: EntitySpec, dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.prefix = spec.prefix
        self.categorical = nn.ModuleList(
            embedding(size, dim, sparse) for size in spec.categorical_sizes
        )
        self.bags = nn.ModuleList(embedding(size, dim, sparse) for size in spec.bag_sizes)
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
        shape: TowerShape,
        sparse: bool = False,
        id_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.use_id = spec.use_id
        self.id_dropout = id_dropout
        self.item_embedding = item_embedding
        self.attributes = AttributeEmbedder(spec, item_embedding.embedding_dim, sparse)
        in_dim = self.attributes.out_dim + (item_embedding.embedding_dim if self.use_id else 0)
        self.mlp = mlp(max(in_dim, 1), shape.hidden, shape.output_dim, shape.dropout, shape.norm)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        parts = self.attributes(inputs)
        if self.use_id:
            ids = inputs["item_id"]
            if self.training and self.id_dropout > 0:
                # Train the OOV slot and the attributes to stand in for an unknown id, as
                # they must for cold-start items at serving time.
                dropped = torch.rand(ids.shape, device=ids.device) < self.id_dropout
                ids = ids.masked_fill(dropped, OOV_INDEX)
            parts.insert(0, self.item_embedding(ids))
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class HistoryItemEmbedder(nn.Module):
    """Embeds history item codes: the id embedding, plus (optionally) the item's attributes.

    With ``attributes`` (the item tower's :class:`AttributeEmbedder`, shared) each history
    item also adds its genres, title words, numbers... looked up by id code in buffers
    filled once by :meth:`set_item_attributes`, so a rarely seen item in a history still
    says what kind of item it is. The buffers travel in checkpoints and in the ONNX graph,
    so the served user tower keeps taking plain item codes.
    """

    def __init__(
        self, item_embedding: nn.Embedding, attributes: AttributeEmbedder | None = None
    ) -> None:
        super().__init__()
        self.item_embedding = item_embedding
        self.attributes = attributes
        n_codes = item_embedding.num_embeddings
        if attributes is not None:
            self.prefix = attributes.prefix
            n_cat = len(attributes.categorical)
            width = sum(attributes.bag_widths)
            n_num = attributes.numeric.in_features if attributes.numeric is not None else 0
            self.register_buffer("code_cat", torch.zeros(n_codes, n_cat, dtype=torch.long))
            self.register_buffer("code_bag", torch.zeros(n_codes, width, dtype=torch.long))
            self.register_buffer("code_num", torch.zeros(n_codes, n_num))
            # 1 where a code's attributes are filled in: padding and unknown codes add nothing
            self.register_buffer("code_known", torch.zeros(n_codes))

    def set_item_attributes(self, codes: Tensor, item_inputs: dict[str, Tensor]) -> None:
        """Fill the lookup from the catalogue: ``codes[r]`` is row r's id code and
        ``item_inputs`` its item-tower inputs. Codes below 2 (padding, unknown) stay empty."""
        if self.attributes is None:
            return
        known = codes >= 2
        known_codes = codes[known]
        with torch.no_grad():
            self.code_known.zero_()
            self.code_known[known_codes] = 1.0
            for name, buffer in (
                ("cat", self.code_cat),
                ("bag", self.code_bag),
                ("num", self.code_num),
            ):
                key = f"{self.prefix}_{name}"
                if key in item_inputs and buffer.shape[1]:
                    buffer[known_codes] = item_inputs[key][known].to(buffer.dtype)

    def forward(self, history: Tensor) -> Tensor:
        embedded = self.item_embedding(history)
        if self.attributes is None:
            return embedded
        if self.training:
            # Each distinct item once: a batch's histories repeat items many times, and
            # their (sparse) attribute gradients would repeat with them. Same result.
            codes, where = torch.unique(history, return_inverse=True)
        else:
            codes, where = history.reshape(-1), None
        inputs = {
            f"{self.prefix}_cat": self.code_cat[codes],
            f"{self.prefix}_bag": self.code_bag[codes],
            f"{self.prefix}_num": self.code_num[codes],
        }
        parts = self.attributes(inputs)
        if not parts:
            return embedded
        extra = torch.stack(parts, dim=0).sum(dim=0) * self.code_known[codes].unsqueeze(-1)
        extra = extra[where] if where is not None else extra.reshape(*history.shape, -1)
        return embedded + extra


class UserTower(nn.Module):
    """Optional user id + attributes + pooled recent item embeddings -> MLP -> unit vector."""

    def __init__(
        self,
        spec: EntitySpec,
        item_embedding: nn.Embedding,
        history_length: int,
        shape: TowerShape,
        history_pooling: str = "mean",
        sparse: bool = False,
        history_embedder: HistoryItemEmbedder | None = None,
    ) -> None:
        super().__init__()
        dim = item_embedding.embedding_dim
        self.use_id = spec.use_id
        self.user_embedding = embedding(spec.id_size, dim, sparse) if self.use_id else None
        self.history_embedding = (
            history_embedder
            if history_embedder is not None
            else HistoryItemEmbedder(item_embedding)
        )
        self.pooling = HistoryPooling(history_pooling, history_length, dim)
        self.attributes = AttributeEmbedder(spec, dim, sparse)
        in_dim = self.attributes.out_dim + self.pooling.out_dim + (dim if self.use_id else 0)
        self.mlp = mlp(in_dim, shape.hidden, shape.output_dim, shape.dropout, shape.norm)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        history = inputs["history"]
        parts = [self.pooling(self.history_embedding(history), history), *self.attributes(inputs)]
        if self.user_embedding is not None:
            parts.insert(0, self.user_embedding(inputs["user_id"]))
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class ConcatTowers(nn.Module):
    """Several towers of the same kind side by side: their unit vectors concatenated and
    scaled by ``1/sqrt(n)``, so the result is a unit vector and a dot product of two such
    vectors is the mean of the members' cosine scores (an ensemble in one FAISS index)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        vectors = [member(inputs) for member in self.members]
        return torch.cat(vectors, dim=-1) / len(self.members) ** 0.5


class TwoTowerModel(nn.Module):
    """The user and item towers, sharing the item id embedding table by default.

    With ``ensemble=n > 1`` each side is :class:`ConcatTowers` of ``n`` towers (each pair
    with its own embedding tables), filled from ``n`` separately trained single-pair models
    (``towers.pipeline.assemble``); the served vectors are ``n x output_dim`` wide.
    With ``history_attributes`` the user tower's history items also carry the item
    tower's attribute embeddings (:class:`HistoryItemEmbedder`; fill its lookup with
    :meth:`set_item_attributes`).
    """

    def __init__(self, spec: TowerSpec, config: TowerConfig | None = None) -> None:
        super().__init__()
        config = config or TowerConfig()
        embedding_dim, shape = config.embedding_dim, config.shape
        share_item_embedding, history_pooling = config.share_item_embedding, config.history_pooling
        sparse_embeddings, item_id_dropout = config.sparse_embeddings, config.item_id_dropout
        attribute_init, ensemble = config.attribute_init, config.ensemble
        history_attributes = config.history_attributes
        if attribute_init not in ATTRIBUTE_INITS:
            raise ValueError(
                f"attribute_init must be one of {ATTRIBUTE_INITS}, got {attribute_init!r}"
            )
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.spec = spec
        self.config = config
        item_towers: list[nn.Module] = []
        user_towers: list[nn.Module] = []
        for _ in range(ensemble):
            item_embedding = embedding(spec.items.id_size, embedding_dim, sparse_embeddings)
            history_embedding = (
                item_embedding
                if share_item_embedding
                else embedding(spec.items.id_size, embedding_dim, sparse_embeddings)
            )
            item_tower = ItemTower(
                spec.items, item_embedding, shape, sparse_embeddings, item_id_dropout
            )
            item_towers.append(item_tower)
            user_towers.append(
                UserTower(
                    spec.users,
                    history_embedding,
                    spec.history_length,
                    shape,
                    history_pooling,
                    sparse_embeddings,
                    HistoryItemEmbedder(
                        history_embedding, item_tower.attributes if history_attributes else None
                    ),
                )
            )
        self.item_tower = item_towers[0] if ensemble == 1 else ConcatTowers(item_towers)
        self.user_tower = user_towers[0] if ensemble == 1 else ConcatTowers(user_towers)
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.05)
                with torch.no_grad():
                    module.weight[PAD_INDEX].zero_()
        if attribute_init == "zeros":
            # Attribute tokens never seen in training (a cold item's own title words) then
            # add nothing to its vector instead of random noise.
            for tower in item_towers + user_towers:
                for module in tower.attributes.modules():
                    if isinstance(module, nn.Embedding):
                        nn.init.zeros_(module.weight)

    def set_item_attributes(self, codes: np.ndarray, item_inputs: dict[str, np.ndarray]) -> None:
        """Give every user tower's history the catalogue's item attributes (a no-op unless
        built with ``history_attributes``): ``codes[r]`` is catalogue row r's id code."""
        tensors = {name: torch.as_tensor(values) for name, values in item_inputs.items()}
        towers = getattr(self.user_tower, "members", [self.user_tower])
        for tower in towers:
            tower.history_embedding.set_item_attributes(torch.as_tensor(codes), tensors)


class PositionalTower(nn.Module):
    """Wraps a tower so it takes positional tensors in ``input_names`` order (for ONNX)."""

    def __init__(self, tower: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.tower = tower
        self.input_names = list(input_names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.tower(dict(zip(self.input_names, tensors, strict=True)))
