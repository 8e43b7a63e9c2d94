"""Warm starts: a new run's model initialised from a previous model, matched by vocabulary.

``init_from`` names the previous model: a training run's directory (the checkpoint it
exported: ``checkpoints/refit/last.ckpt`` after a refit, else its best checkpoint), a
Lightning checkpoint file, or an exported bundle directory (its ONNX graphs hold the
towers' weights and ``encoders.json`` their vocabularies). The new run fits its encoders
on its own data as usual; :func:`warm_start` then carries the previous weights over:

- every embedding table keyed by a vocabulary (item ids, user ids, categories, multi-hot
  tokens) is remapped entry by entry: a value both runs know keeps its learned row,
  wherever its row number now is; the padding and out-of-vocabulary rows are copied;
  values new to this run keep their fresh initialisation;
- hashed-text tables (rows are hash buckets, not vocabulary entries) are copied as they are;
- the numeric input layer is re-expressed in the new run's normalisation (its refitted
  mean and std), so it computes the same function of the raw numbers as before (within
  the ±5 clip of both normalisations);
- every other parameter (the MLPs, history pooling, a learned temperature) is copied;
  its shape must match.

Optionally (:class:`ShrinkPerturb`, ``init_shrink`` / ``init_perturb``) every carried
weight is shrunk towards zero and mixed with the fresh initialisation instead of copied
as it is: Ash & Adams's remedy for warm-started networks generalising worse than fresh
ones.

Buffers derived from the data (the items' sampling log-probabilities, the history
attribute lookups) keep what the new data gives them, and a fixed temperature stays the
config's. Only weights carry over: the optimiser and scheduler start afresh. A previous
model of another shape (embedding width, MLP widths, pooling, feature columns...) is a
:class:`WarmStartError` that names the path and every mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from towers.model.towers import AttributeEmbedder, HistoryItemEmbedder, ItemTower, UserTower
from twotower.bundle import layout
from twotower.encoding import (
    FIRST_KNOWN_INDEX,
    EntityEncoder,
    FeatureEncoders,
    MultiHotEncoder,
    Vocabulary,
)
from twotower.errors import TwoTowerError

log = logging.getLogger(__name__)

ENCODERS_KEY = "feature_encoders"
"""Where a checkpoint keeps the feature encoders its embedding rows are keyed by."""
# tower settings that decide the shapes and the wiring of the weights
ARCHITECTURE = (
    "embedding_dim",
    "hidden",
    "output_dim",
    "norm",
    "share_item_embedding",
    "history_pooling",
    "history_attributes",
)
MEMBER_KEY = re.compile(r"\.members\.(\d+)\.")
ONNX_PREFIX = "tower."
TOWER_FILES = {layout.ITEM_TOWER: "model.item_tower.", layout.USER_TOWER: "model.user_tower."}
TEMPERATURE = "log_temperature"
DATA_BUFFER = "item_log_p"
HISTORY_BUFFERS = ("code_cat", "code_bag", "code_num", "code_known")
VOCABULARY_KINDS = ("ids", "category", "multi_hot")
MAX_LISTED = 12


class WarmStartError(TwoTowerError, ValueError):
    """``init_from`` is missing, unreadable, or holds a model this run cannot start from."""


@dataclass
class PreviousModel:
    """A previous model: its weights (state-dict names), the encoders its embedding rows
    are keyed by, and its tower settings when recorded."""

    path: Path
    state: dict[str, Tensor]
    encoders: FeatureEncoders
    towers: dict[str, Any] | None = None


@dataclass(frozen=True)
class ShrinkPerturb:
    """Shrink and perturb (Ash & Adams, "On Warm-Starting Neural Network Training",
    NeurIPS 2020): each carried weight (entry) becomes ``shrink * previous + perturb *
    fresh``, ``fresh`` this run's own initialisation of it. ``shrink=1, perturb=0`` (the
    default) copies the previous weights unchanged. Rows of values new to this run keep
    their fresh initialisation; a learned temperature, buffers (BatchNorm's running
    statistics) and integer tensors are copied as they are."""

    shrink: float = 1.0
    perturb: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.shrink <= 1.0:
            raise WarmStartError(f"init_shrink must be in (0, 1], got {self.shrink}")
        if not 0.0 <= self.perturb <= 1.0:
            raise WarmStartError(f"init_perturb must be in [0, 1], got {self.perturb}")

    @property
    def copies(self) -> bool:
        """Whether the previous weights are carried over unchanged."""
        return self.shrink == 1.0 and self.perturb == 0.0

    def __call__(self, previous: Tensor, fresh: Tensor) -> Tensor:
        """``previous`` shrunk and perturbed with ``fresh`` (same shape), in ``fresh``'s dtype."""
        previous = previous.to(fresh.dtype)
        if self.copies or not fresh.is_floating_point():
            return previous
        return self.shrink * previous + self.perturb * fresh


COPY = ShrinkPerturb()


@dataclass(frozen=True)
class Role:
    """What the rows of one weight mean: ``kind`` is ``ids``, ``category``, ``multi_hot``,
    ``hashed``, ``numeric_weight``, ``numeric_bias`` or ``data`` (a buffer the new data
    fills); ``entity`` is ``items`` or ``users``; ``column`` names the feature column."""

    kind: str
    entity: str = ""
    column: str = ""


# ---------------------------------------------------------------------------- sources


def check_source(init_from: str | Path) -> Path:
    """``init_from`` as a path that exists, or a :class:`WarmStartError` naming it."""
    path = Path(init_from).expanduser()
    if not path.exists():
        raise WarmStartError(
            f"init_from {path}: no such file or directory (give a training run's directory, "
            "a checkpoint (.ckpt) or a bundle directory)"
        )
    return path


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / layout.MANIFEST).is_file()


def resolve_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a training run exported: its refit model if it refitted, else its
    best checkpoint (as recorded in ``last.ckpt``), else ``last.ckpt``."""
    checkpoints = run_dir / "checkpoints"
    refit = checkpoints / "refit" / "last.ckpt"
    if refit.is_file():
        return refit
    last = checkpoints / "last.ckpt"
    if last.is_file():
        best = best_checkpoint_of(last)
        return best if best is not None else last
    found = sorted(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1]
    raise WarmStartError(
        f"init_from {run_dir}: no checkpoint found (looked for checkpoints/refit/last.ckpt, "
        "checkpoints/last.ckpt and checkpoints/*.ckpt); give a training run's directory, a "
        "checkpoint (.ckpt) or a bundle directory"
    )


def best_checkpoint_of(last: Path) -> Path | None:
    """The best checkpoint ``ModelCheckpoint`` recorded in ``last``: the file of that name
    beside ``last`` (the run directory may have been moved or copied since), else the
    recorded path."""
    try:
        state = torch.load(last, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise WarmStartError(f"init_from {last}: not a readable checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise WarmStartError(f"init_from {last}: not a Lightning checkpoint")
    for key, value in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_path"):
            recorded = Path(value["best_model_path"])
            for candidate in (last.parent / recorded.name, recorded):
                if candidate.is_file():
                    return candidate
    return None


def resolve_source(init_from: str | Path, member: int | None = None) -> Path:
    """The checkpoint file or bundle directory ``init_from`` names; ``member``: this run
    is member ``member`` of an ensemble, which starts from the same member of an ensemble
    run (``members/<member>/``)."""
    path = check_source(init_from)
    if path.is_file() or is_bundle(path):
        return path
    members = path / "members"
    if members.is_dir():
        if member is None:
            count = len([p for p in members.iterdir() if p.is_dir()])
            raise WarmStartError(
                f"init_from {path}: an ensemble run ({count} members under members/); "
                f"warm-start a model.ensemble={count} run from it, or give one member's "
                f"directory ({members}/0)"
            )
        path = members / str(member)
        if not path.is_dir():
            raise WarmStartError(f"init_from {members.parent}: the ensemble has no member {member}")
    return resolve_checkpoint(path)


def load_previous(init_from: str | Path, member: int | None = None) -> PreviousModel:
    """Read the previous model ``init_from`` names (see :func:`resolve_source`)."""
    path = resolve_source(init_from, member)
    previous = load_bundle(path) if is_bundle(path) else load_checkpoint(path)
    previous.state = select_member(previous.state, member, path)
    return previous


def load_checkpoint(path: Path) -> PreviousModel:
    """Weights, encoders and tower settings of a Lightning checkpoint of ours."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise WarmStartError(f"init_from {path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise WarmStartError(f"init_from {path}: not a Lightning checkpoint (no state_dict)")
    encoders = checkpoint.get(ENCODERS_KEY)
    if encoders is None:
        raise WarmStartError(
            f"init_from {path}: the checkpoint holds no feature encoders (it was written "
            "before warm starts were supported), so its embedding rows cannot be matched to "
            "ids; warm-start from the bundle that run exported instead"
        )
    state = dict(checkpoint["state_dict"])
    towers = checkpoint.get("hyper_parameters", {}).get("towers")
    if dataclasses.is_dataclass(towers) and not isinstance(towers, type):
        towers = dataclasses.asdict(towers)
    return PreviousModel(
        path,
        state,
        FeatureEncoders.from_dict(encoders),
        dict(towers) if isinstance(towers, Mapping) else None,
    )


def load_bundle(path: Path) -> PreviousModel:
    """Weights from a bundle's ONNX graphs (their initialisers keep the towers' parameter
    names), encoders from ``encoders.json``, tower settings from the manifest's config."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx comes with the train extra
        raise WarmStartError(
            f"init_from {path}: reading a bundle's weights needs the onnx package"
        ) from exc
    state: dict[str, Tensor] = {}
    for name, prefix in TOWER_FILES.items():
        try:
            graph = onnx.load(str(path / name)).graph
        except Exception as exc:
            raise WarmStartError(f"init_from {path}: cannot read {name} ({exc})") from exc
        for initializer in graph.initializer:
            if initializer.name.startswith(ONNX_PREFIX):
                key = prefix + initializer.name[len(ONNX_PREFIX) :]
                state[key] = torch.from_numpy(numpy_helper.to_array(initializer).copy())
    try:
        encoders = FeatureEncoders.load(path / layout.ENCODERS)
        manifest = json.loads((path / layout.MANIFEST).read_text(encoding="utf-8"))
    except Exception as exc:
        raise WarmStartError(f"init_from {path}: cannot read the bundle ({exc})") from exc
    model = manifest.get("config", {}).get("model")
    towers = {k: model[k] for k in ARCHITECTURE if k in model} if isinstance(model, dict) else None
    return PreviousModel(path, state, encoders, towers)


def select_member(state: dict[str, Tensor], member: int | None, path: Path) -> dict[str, Tensor]:
    """The weights of ensemble member ``member`` (names without ``members.<i>.``) when
    ``state`` is an ensemble's; a single model's weights as they are."""
    indices = {int(m.group(1)) for key in state if (m := MEMBER_KEY.search(key))}
    if not indices:
        return state
    if member is None:
        raise WarmStartError(
            f"init_from {path}: an ensemble of {len(indices)} tower pairs; warm-start a "
            f"model.ensemble={len(indices)} run from it"
        )
    if member not in indices:
        raise WarmStartError(f"init_from {path}: the ensemble has no member {member}")
    marker = f".members.{member}."
    return {
        key.replace(marker, "."): value
        for key, value in state.items()
        if marker in key or not MEMBER_KEY.search(key)
    }


# ---------------------------------------------------------------------------- the remap


def weight_roles(module: nn.Module, encoders: FeatureEncoders) -> dict[str, Role]:
    """The :class:`Role` of every vocabulary-keyed, numeric-input or data-derived entry of
    ``module``'s state dict; the entries left out are plain weights."""
    roles: dict[str, Role] = {DATA_BUFFER: Role("data")}
    for name, child in module.named_modules(remove_duplicate=False):
        at = f"{name}." if name else ""
        if isinstance(child, (ItemTower, HistoryItemEmbedder)):
            roles[f"{at}item_embedding.weight"] = Role("ids", "items")
        if isinstance(child, HistoryItemEmbedder):
            roles.update({f"{at}{buffer}": Role("data") for buffer in HISTORY_BUFFERS})
        if isinstance(child, UserTower) and child.user_embedding is not None:
            roles[f"{at}user_embedding.weight"] = Role("ids", "users")
        if isinstance(child, AttributeEmbedder):
            entity = "items" if child.prefix == "item" else "users"
            encoder = getattr(encoders, entity)
            for index, column in enumerate(encoder.categorical):
                roles[f"{at}categorical.{index}.weight"] = Role("category", entity, column)
            bag_columns = [*encoder.multi_hot, *encoder.text]
            for index, (column, bag) in enumerate(zip(bag_columns, encoder.bags, strict=True)):
                kind = "multi_hot" if isinstance(bag, MultiHotEncoder) else "hashed"
                roles[f"{at}bags.{index}.weight"] = Role(kind, entity, column)
            if child.numeric is not None:
                roles[f"{at}numeric.weight"] = Role("numeric_weight", entity)
                roles[f"{at}numeric.bias"] = Role("numeric_bias", entity)
    return roles


def is_data(key: str) -> bool:
    """Whether a state entry is a buffer the data fills (never carried over)."""
    return key == DATA_BUFFER or key.rsplit(".", 1)[-1] in HISTORY_BUFFERS


def vocabulary_of(encoders: FeatureEncoders, role: Role) -> Vocabulary:
    """The vocabulary whose entries key the rows of a weight of ``role``."""
    encoder: EntityEncoder = getattr(encoders, role.entity)
    if role.kind == "ids":
        return encoder.ids
    if role.kind == "category":
        return encoder.categorical[role.column]
    return encoder.multi_hot[role.column].vocabulary


def remap_rows(
    new: Tensor,
    old: Tensor,
    new_vocabulary: Vocabulary,
    old_vocabulary: Vocabulary,
    blend: ShrinkPerturb = COPY,
) -> tuple[Tensor, int]:
    """``new`` with the row of every value ``old_vocabulary`` knows taken from ``old``
    (matched by value, not by row number) and the padding and out-of-vocabulary rows
    copied (through ``blend``); the other rows (values new to this run) as they were.
    Also returns how many values were carried over."""
    out = new.detach().clone()
    old_rows = old_vocabulary.encode(list(new_vocabulary.values))
    known = old_rows >= FIRST_KNOWN_INDEX
    new_rows = torch.from_numpy(np.flatnonzero(known) + FIRST_KNOWN_INDEX)
    with torch.no_grad():
        out[new_rows] = blend(old[torch.from_numpy(old_rows[known])], out[new_rows])
        out[:FIRST_KNOWN_INDEX] = blend(old[:FIRST_KNOWN_INDEX], out[:FIRST_KNOWN_INDEX])
    return out, int(known.sum())


def numeric_change(old: EntityEncoder, new: EntityEncoder) -> tuple[Tensor, Tensor]:
    """Per numeric column: ``scale`` and ``offset`` with ``z_old = scale * z_new + offset``
    for one raw value (``z``: a value as each run normalises it)."""
    scale = [new.numeric[c].std / old.numeric[c].std for c in new.numeric]
    offset = [(new.numeric[c].mean - old.numeric[c].mean) / old.numeric[c].std for c in new.numeric]
    return torch.tensor(scale, dtype=torch.float64), torch.tensor(offset, dtype=torch.float64)


def config_problems(previous: PreviousModel, towers: Any, encoders: FeatureEncoders) -> list[str]:
    """How the previous model's settings and feature columns differ from this run's."""
    problems = []
    if previous.towers is not None and towers is not None:
        for name in ARCHITECTURE:
            if name not in previous.towers:
                continue
            before, now = previous.towers[name], getattr(towers, name)
            if name == "hidden":
                before, now = [int(w) for w in before], [int(w) for w in now]
            if before != now:
                problems.append(f"model.{name}: {before} in init_from, {now} here")
    for entity in ("items", "users"):
        old, new = getattr(previous.encoders, entity), getattr(encoders, entity)
        if old.use_id != new.use_id:
            problems.append(
                f"features.use_{new.prefix}_id: {old.use_id} in init_from, {new.use_id} here"
            )
        for kind in ("categorical", "multi_hot", "numeric", "text"):
            before, now = list(getattr(old, kind)), list(getattr(new, kind))
            if before != now:
                problems.append(f"{new.prefix} {kind} columns: {before} in init_from, {now} here")
        for column, text in new.text.items():
            was = old.text.get(column)
            if was is not None and was.buckets != text.buckets:
                problems.append(
                    f"features.text_buckets ({new.prefix} {column}): {was.buckets} in "
                    f"init_from, {text.buckets} here"
                )
    return problems


@dataclass
class Remap:
    """The outcome of :func:`remap_state`: the new state dict, how many vocabulary entries
    each table carried over (of how many), and the mismatches found."""

    state: dict[str, Tensor]
    carried: dict[str, tuple[int, int]]
    problems: list[str]


def remap_state(
    module: nn.Module,
    encoders: FeatureEncoders,
    previous: PreviousModel,
    blend: ShrinkPerturb = COPY,
) -> Remap:
    """``module``'s state dict (a :class:`~towers.model.module.TwoTowerModule` built for
    this run's ``encoders``) with the previous weights carried over as the module's
    docstring says (through ``blend``). Nothing is loaded; mismatches are listed in
    ``problems``."""
    state = module.state_dict(keep_vars=True)
    roles = weight_roles(module, encoders)
    # shared weights (the item id table of both towers) appear under several names
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(id(value), []).append(key)
    out = {key: value.detach() for key, value in state.items()}
    carried: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    used: set[str] = set()
    for keys in groups.values():
        name = keys[0]
        if is_data(name):
            continue
        if name == TEMPERATURE:
            used.add(name)
            learned = state[name].requires_grad
            if learned and name in previous.state:
                out[name] = previous.state[name].detach().clone().to(out[name].dtype)
            continue
        found = next((k for k in keys if k in previous.state), None)
        if found is None:
            problems.append(f"{name}: not in init_from")
            continue
        used.update(keys)
        used.add(found)
        role = roles.get(name)
        # buffers (BatchNorm's running statistics) are statistics, not weights: copied
        mix = blend if isinstance(state[name], nn.Parameter) else COPY
        value, count = carry(name, role, out[name], found, encoders, previous, problems, mix)
        if value is not None:
            out.update({k: value for k in keys})
        if count is not None and role is not None:
            carried[name] = (count, len(vocabulary_of(encoders, role).values))
    problems += [
        f"{k}: only in init_from" for k in sorted(set(previous.state) - used) if not is_data(k)
    ]
    return Remap(out, carried, problems)


def carry(
    name: str,
    role: Role | None,
    new: Tensor,
    found: str,
    encoders: FeatureEncoders,
    previous: PreviousModel,
    problems: list[str],
    blend: ShrinkPerturb = COPY,
) -> tuple[Tensor | None, int | None]:
    """One weight carried over by its role (through ``blend``), and for a vocabulary-keyed
    table how many entries kept their rows; None (and a line in ``problems``) if it
    cannot be."""
    old = previous.state[found]
    if role is not None and role.kind in VOCABULARY_KINDS:
        if old.ndim != 2 or old.shape[1] != new.shape[1]:
            problems.append(
                f"{name}: embedding width {old.shape[-1]} in init_from, {new.shape[1]} here "
                "(model.embedding_dim)"
            )
            return None, None
        old_vocabulary = vocabulary_of(previous.encoders, role)
        if old.shape[0] != old_vocabulary.size:
            problems.append(
                f"{name}: {old.shape[0]} rows in init_from, but its vocabulary has "
                f"{old_vocabulary.size} (with padding and out-of-vocabulary)"
            )
            return None, None
        return remap_rows(new, old, vocabulary_of(encoders, role), old_vocabulary, blend)
    if old.shape != new.shape:
        problems.append(f"{name}: shape {tuple(old.shape)} in init_from, {tuple(new.shape)} here")
        return None, None
    if role is not None and role.kind in ("numeric_weight", "numeric_bias"):
        # the layer y = W z + b saw z_old = scale * z_new + offset: in terms of z_new it is
        # W' = W * scale (per column) and b' = b + W @ offset
        entity = role.entity
        scale, offset = numeric_change(
            getattr(previous.encoders, entity), getattr(encoders, entity)
        )
        weight = previous.state[found.rsplit(".", 1)[0] + ".weight"].double()
        if role.kind == "numeric_weight":
            return blend(weight * scale, new), None
        return blend(old.double() + weight @ offset, new), None
    return blend(old.detach().clone(), new), None


def warm_start(
    module: nn.Module,
    encoders: FeatureEncoders,
    init_from: str | Path,
    member: int | None = None,
    blend: ShrinkPerturb = COPY,
) -> PreviousModel:
    """Load the previous model ``init_from`` names into ``module`` (a
    :class:`~towers.model.module.TwoTowerModule` built for this run's ``encoders``),
    remapped by vocabulary and passed through ``blend`` (unchanged by default); returns
    what was read. ``member``: this run is that member of an ensemble (see
    :func:`resolve_source`). Raises :class:`WarmStartError` naming the
    path and every mismatch when the previous model does not fit."""
    previous = load_previous(init_from, member)
    problems = config_problems(previous, getattr(module, "towers", None), encoders)
    if problems:
        raise WarmStartError(
            f"init_from {previous.path}: trained with another model config:\n  - "
            + "\n  - ".join(problems)
        )
    remap = remap_state(module, encoders, previous, blend)
    if remap.problems:
        listed = remap.problems[:MAX_LISTED]
        more = len(remap.problems) - len(listed)
        hint = ""
        if is_bundle(previous.path) and any(p.endswith("not in init_from") for p in listed):
            hint = (
                "\nthe bundle's ONNX graphs do not hold these weights under their names, so "
                "it cannot seed a warm start; give the training run's directory or a "
                "checkpoint (.ckpt) instead"
            )
        raise WarmStartError(
            f"init_from {previous.path}: its weights do not fit this run's model:\n  - "
            + "\n  - ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
            + hint
        )
    module.load_state_dict(remap.state)
    log.info(
        "warm start from %s: %s",
        previous.path,
        ", ".join(f"{k} {n}/{size} rows kept" for k, (n, size) in remap.carried.items()),
    )
    if not blend.copies:
        log.info(
            "carried weights shrunk and perturbed: %g x previous + %g x fresh",
            blend.shrink,
            blend.perturb,
        )
    return previous
