"""Export a bundle from any checkpoint of a training run.

twotower export RUN_DIR [--ckpt best|last|PATH] [--out DIR] [key=value ...]

RUN_DIR is a run directory of `twotower train` (it holds .hydra/config.yaml); its
config rebuilds the data and encoders, so the bundle matches the checkpoint. Relative
data paths in it are read from the directory the run was started in, so this works
from any directory. Overrides use the training config's keys, e.g. export.index=HNSW32
export.recall_floor=0.98. Without --out the bundle replaces RUN_DIR/bundle and the
run's `latest` link follows it; with --out, `latest` is left alone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf

from twotower.errors import TwoTowerError

log = logging.getLogger("twotower.export")


def find_checkpoint(run_dir: Path, choice: str) -> Path:
    """``best`` (the best-scoring epoch checkpoint), ``last``, or a path."""
    checkpoints = run_dir / "checkpoints"
    if choice == "last":
        path = checkpoints / "last.ckpt"
    elif choice == "best":
        import torch

        last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
        states = [
            v for k, v in last.get("callbacks", {}).items() if k.startswith("ModelCheckpoint")
        ]
        best = states[0].get("best_model_path") if states else None
        path = Path(best) if best else checkpoints / "last.ckpt"
    else:
        path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return path


def run(argv: list[str]) -> int:
    """Parse ``argv`` and export; the exit status."""
    parser = argparse.ArgumentParser(
        prog="twotower export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ckpt", default="best", help="best | last | path to a .ckpt")
    parser.add_argument("--out", type=Path, help="bundle directory (default: RUN_DIR/bundle)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_intermixed_args(argv)

    from towers.config import absolute_paths, run_directory_of
    from towers.export.bundle import export_bundle
    from towers.model.module import TwoTowerModule
    from towers.pipeline import evaluate_all, export_settings, prepare

    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    )
    try:
        config_file = args.run_dir / ".hydra" / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file}: no such file; is {args.run_dir} a training run directory?"
            )
        cfg = OmegaConf.load(config_file)
        cfg.paths.output_dir = str(args.run_dir.resolve())
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
        absolute_paths(cfg, run_directory_of(args.run_dir))
        if args.out is not None:
            cfg.export.latest = None
        checkpoint = find_checkpoint(args.run_dir, args.ckpt)
        log.info("exporting %s", checkpoint)
        data = prepare(cfg)
        module = TwoTowerModule.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=False
        ).eval()
        metrics = evaluate_all(module, data, list(cfg.eval.ks))
        target = args.out.resolve() if args.out else args.run_dir.resolve() / "bundle"
        config = OmegaConf.to_container(cfg, resolve=False)
        bundle = export_bundle(
            module, data, target, settings=export_settings(cfg), config=config, metrics=metrics
        )
    except (TwoTowerError, FileNotFoundError, ValueError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    print(f"bundle: {bundle}")
    return 0
