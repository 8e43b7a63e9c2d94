"""An optimiser for sparse embedding gradients next to dense MLP weights.

``torch.optim.Adam`` rejects sparse gradients and ``SparseAdam`` rejects dense ones;
:class:`SparseDenseAdam` runs each on its own parameter groups behind one Optimizer,
so Lightning, LR schedulers and checkpoints see a single optimiser. Groups flagged
``sparse=True`` (the module flags its sparse embedding tables) go to ``SparseAdam``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Adam, Optimizer, SparseAdam


class SparseDenseAdam(Optimizer):
    """Lazy Adam (``SparseAdam``) on sparse groups, Adam on the rest, sharing the groups."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "sparse": False})
        dense = [g for g in self.param_groups if not g["sparse"]]
        sparse = [g for g in self.param_groups if g["sparse"]]
        # The inner optimisers hold the very same group dicts, so schedulers that change
        # ``lr`` here change it there.
        self._dense = Adam(dense, lr=lr, betas=betas, eps=eps, fused=fused) if dense else None
        self._sparse = SparseAdam(sparse, lr=lr, betas=betas, eps=eps) if sparse else None
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
        return {"inner": [o.state_dict() for o in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.inner, state_dict["inner"], strict=True):
            optimizer.load_state_dict(state)
        # Loading gives the inner optimisers new group dicts: share them again.
        inner = {"dense": self._dense, "sparse": self._sparse}
        self.param_groups = [inner[kind].param_groups[i] for kind, i in self._layout]  # type: ignore[union-attr]
