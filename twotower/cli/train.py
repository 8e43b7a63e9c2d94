"""``twotower train [key=value ...]``: train, evaluate, export and print a sample
recommendation. The arguments are Hydra overrides of ``conf/train.yaml`` (``--help``
lists the config groups, ``--cfg job`` prints the composed config)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from twotower.config import config_dir


def metrics_table(metrics: dict[str, float], ks: list[int]) -> str:
    """A small Markdown table: model and popularity on validation and test."""
    rows = ["| run | " + " | ".join(f"{m}@{k}" for m in ("recall", "ndcg") for k in ks) + " |"]
    rows.append("|---" * (1 + 2 * len(ks)) + "|")
    for stage in ("val", "test"):
        for name, prefix in (("twotower", f"{stage}/"), ("popularity", f"{stage}_popularity/")):
            key = f"{prefix}recall@{ks[0]}"
            if key not in metrics:
                continue
            cells = [f"{metrics[f'{prefix}{m}@{k}']:.4f}" for m in ("recall", "ndcg") for k in ks]
            rows.append(f"| {stage} {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def task(cfg: Any) -> float:
    """The Hydra task: the whole main job on the composed config."""
    from omegaconf import OmegaConf

    from towers.data.sources import load_data_in_background

    # the data loads (or is generated) while torch and Lightning are imported; from a
    # prepared directory (data.prepared) the pipeline reads what it needs itself
    tables = (
        None
        if cfg.data.get("prepared")
        else load_data_in_background(OmegaConf.to_container(cfg.data, resolve=True))
    )
    from retrieval import Retriever
    from towers.pipeline import train

    result = train(cfg, tables)
    if result is None:  # a DDP process other than rank 0
        return float("nan")
    print(metrics_table(result.metrics, list(cfg.eval.ks)))
    print(f"bundle: {result.bundle}")
    retriever = Retriever.load(result.bundle)
    user = result.data.test_source.user_ids[0]
    ids, scores = retriever.recommend(user_id=user, k=5)
    print(
        f"sample recommendation for user {user}: "
        + ", ".join(f"{i} ({s:.3f})" for i, s in zip(ids, scores, strict=True))
    )
    return float(result.metrics[cfg.optimized_metric])


def run(args: list[str]) -> int:
    """Run Hydra's main with ``args`` as its command line; Hydra reports a failure with
    its message and exits with status 1."""
    import hydra

    import __main__

    # Lightning's DDP launcher starts the other processes as `python -m <__main__'s
    # module> <sys.argv[1:]>`: make that this module, with the overrides as arguments.
    __main__.__spec__ = importlib.util.find_spec("twotower.cli.train")
    sys.argv = [sys.argv[0], *args]
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(task)()
    return 0


if __name__ == "__main__":  # how DDP worker processes start (see run)
    sys.exit(run(sys.argv[1:]))
