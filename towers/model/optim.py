"""An optimiser for sparse embedding gradients next to dense MLP weights.

``torch.optim.Adam`` rejects sparse gradients and ``SparseAdam`` rejects dense ones;
:class:`SparseDenseAdam` runs each on its own parameter groups behind one Optimizer,
so Lightning, LR schedulers and checkpoints see a single optimiser. Groups flagged
``sparse=True`` (the module flags its sparse embedding tables) go to ``SparseAdam``, or,
with ``sparse_rule="rowwise_adagrad"``, to :class:`RowwiseAdagrad`: one accumulator per
embedding row instead of Adam's two moments per weight, the rule TorchRec and FBGEMM use
for tables too large for per-weight optimiser state. ``sparse_rule="auto"`` (the default)
takes lazy Adam while its two moments for the sparse tables stay within
``adam_state_limit_gb`` and row-wise Adagrad past it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Adam, Optimizer, SparseAdam

SPARSE_RULES = ("auto", "adam", "rowwise_adagrad")
# "auto" keeps lazy Adam while its two moments for the id tables take at most this much:
# MovieLens' and the 10M-event ladder rung's tables are a few MB to 0.3 GB; the 100M rung's
# 5M + 1M rows of 64 would take 3 GB (docs/scaling.md)
ADAM_STATE_LIMIT_GB = 1.0
# row-wise Adagrad's step size when sparse_lr is not set: its steps are divided by the
# root of the row's accumulated squared gradient, so Adam's lr (0.003) would barely move
# a row; 0.1 trains the default main job to lazy Adam's quality (docs/training.md)
ROWWISE_LR = 0.1

log = logging.getLogger(__name__)


class RowwiseAdagrad(Optimizer):
    """Adagrad with one accumulator per row of each (sparse-gradient) embedding table:
    each step adds the mean of a touched row's squared gradient to its accumulator ``s``
    and moves the row by ``-lr * g / (sqrt(s) + eps)``; untouched rows do not move. Its
    state is 4 bytes per row, where Adam's is two floats per weight (``2 x dim`` per
    row). Takes sparse or dense gradients of 2-d parameters."""

    def __init__(self, params: Iterable[Any], lr: float = 0.01, eps: float = 1e-8) -> None:
        if lr <= 0 or eps <= 0:
            raise ValueError(f"lr and eps must be positive, got lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.dim() != 2:
                    raise ValueError(f"RowwiseAdagrad takes 2-d tables, got {tuple(param.shape)}")
                grad = param.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows = torch.arange(param.shape[0], device=param.device)
                    values = grad
                state = self.state[param]
                if "sum" not in state:
                    state["sum"] = torch.zeros(
                        param.shape[0], dtype=param.dtype, device=param.device
                    )
                total = state["sum"]
                total.index_add_(0, rows, values.pow(2).mean(dim=1))
                scale = total[rows].sqrt_().add_(group["eps"])
                param.index_add_(0, rows, values / scale.unsqueeze(1), alpha=-group["lr"])
        return loss


def adam_state_bytes(groups: Iterable[dict[str, Any]]) -> int:
    """Bytes of Adam's two moments (one of each per weight) for the parameters of ``groups``."""
    return sum(2 * p.numel() * p.element_size() for g in groups for p in g["params"])


class SparseDenseAdam(Optimizer):
    """Lazy Adam (``SparseAdam``) on sparse groups, Adam on the rest, sharing the groups.

    ``sparse_rule="rowwise_adagrad"`` runs :class:`RowwiseAdagrad` on the sparse groups
    instead, at ``sparse_lr`` (default :data:`ROWWISE_LR`): its state for an embedding
    table of dimension ``d`` is ``1 / (2 d)`` of Adam's. ``"auto"`` (the default) takes
    lazy Adam while Adam's state for the sparse groups stays within
    ``adam_state_limit_gb``, row-wise Adagrad past it (logged); :attr:`sparse_rule` is the
    rule taken (see docs/scaling.md)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
        sparse_rule: str = "auto",
        sparse_lr: float | None = None,
        adam_state_limit_gb: float = ADAM_STATE_LIMIT_GB,
    ) -> None:
        if sparse_rule not in SPARSE_RULES:
            raise ValueError(f"sparse_rule must be one of {SPARSE_RULES}, got {sparse_rule!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "sparse": False})
        dense = [g for g in self.param_groups if not g["sparse"]]
        sparse = [g for g in self.param_groups if g["sparse"]]
        rowwise_lr = ROWWISE_LR if sparse_lr is None else sparse_lr
        if sparse_rule == "auto":
            state = adam_state_bytes(sparse)
            sparse_rule = "adam" if state <= adam_state_limit_gb * 1e9 else "rowwise_adagrad"
            if sparse_rule != "adam":
                log.info(
                    "Adam's moments for the id tables would take %.2f GB (over "
                    "adam_state_limit_gb=%g): they train with row-wise Adagrad at "
                    "sparse_lr %g instead (+model.optimizer.sparse_rule=adam keeps Adam)",
                    state / 1e9,
                    adam_state_limit_gb,
                    rowwise_lr,
                )
        self.sparse_rule = sparse_rule
        # The inner optimisers hold the very same group dicts, so schedulers that change
        # ``lr`` here change it there.
        self._dense = Adam(dense, lr=lr, betas=betas, eps=eps, fused=fused) if dense else None
        self._sparse: Optimizer | None = None
        if sparse and sparse_rule == "adam":
            self._sparse = SparseAdam(sparse, lr=lr, betas=betas, eps=eps)
        elif sparse:
            for group in sparse:
                group["lr"] = rowwise_lr
            self._sparse = RowwiseAdagrad(sparse, lr=rowwise_lr)
        positions = {"dense": 0, "sparse": 0}
        self._layout: list[tuple[str, int]] = []
        for group in self.param_groups:
            kind = "sparse" if group["sparse"] else "dense"
            self._layout.append((kind, positions[kind]))
            positions[kind] += 1

    @property
    def inner(self) -> list[Optimizer]:
        return [o for o in (self._dense, self._sparse) if o is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.inner:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The inner optimisers' states and the sparse rule they were made for."""
        return {"inner": [o.state_dict() for o in self.inner], "sparse_rule": self.sparse_rule}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`; a state of the other sparse rule (one of a checkpoint
        written before ``auto``, without the key, is lazy Adam's) is refused."""
        saved = state_dict.get("sparse_rule", "adam")
        if self._sparse is not None and saved != self.sparse_rule:
            raise ValueError(
                f"the optimiser state was written with sparse_rule={saved} and this run "
                f"trains its id tables with {self.sparse_rule}: set "
                f"+model.optimizer.sparse_rule={saved} to resume it"
            )
        for optimizer, state in zip(self.inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(state)
        # Loading gives the inner optimisers new group dicts: share them again.
        inner = {"dense": self._dense, "sparse": self._sparse}
        self.param_groups = [inner[kind].param_groups[i] for kind, i in self._layout]  # type: ignore[union-attr]
