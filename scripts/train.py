"""Train, evaluate and export a twotower model: ``python scripts/train.py [overrides]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from towers.pipeline import train


def metrics_table(metrics: dict[str, float], ks: list[int]) -> str:
    """A small Markdown table: model and popularity on validation and test."""
    rows = ["| run | " + " | ".join(f"{m}@{k}" for m in ("recall", "ndcg") for k in ks) + " |"]
    rows.append("|---" * (1 + 2 * len(ks)) + "|")
    for stage in ("val", "test"):
        for name, prefix in (("twotower", f"{stage}/"), ("popularity", f"{stage}_popularity/")):
            cells = [f"{metrics[f'{prefix}{m}@{k}']:.4f}" for m in ("recall", "ndcg") for k in ks]
            rows.append(f"| {stage} {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from retrieval import Retriever

    result = train(cfg)
    if result is None:  # a DDP process other than rank 0
        return float("nan")
    print(metrics_table(result.metrics, list(cfg.eval.ks)))
    print(f"bundle: {result.bundle}")
    retriever = Retriever.load(result.bundle)
    user = result.data.test.user_ids[0]
    ids, scores = retriever.recommend(user_id=user, k=5)
    print(
        f"sample recommendation for user {user}: "
        + ", ".join(f"{i} ({s:.3f})" for i, s in zip(ids, scores, strict=True))
    )
    return float(result.metrics[cfg.optimized_metric])


if __name__ == "__main__":
    main()  # Hydra reports an exception with its message and exits with status 1
