"""Fault injection and a soak run against `twotower serve` with two workers on loopback.

twotower bench reliability [--rounds 12 --soak-seconds 120]
Writes docs/benchmarks/reliability.json and .md: per round, the fault injected, the
writes acknowledged and found again; then the soak run's errors, lost writes and RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.reliability import fault_rounds, soak
from benchmarks.report import markdown_table

ROUND_COLUMNS = [
    "round",
    "fault",
    "writes",
    "acknowledged",
    "refused_503",
    "no_answer",
    "errors",
    "events_found",
    "events_lost",
    "items_found",
    "items_lost",
    "workers_diverged",
]


def bundle_root(bundle: Path, target: Path) -> Path:
    """Two copies of ``bundle`` (``a`` and ``b``) under ``target``, for reloads."""
    for name in ("a", "b"):
        shutil.copytree(bundle, target / name)
    return target


def tiny_bundle(work: Path) -> Path:
    """Train and export a small synthetic bundle (the quick experiment, 6 epochs)."""
    from hydra import compose, initialize_config_dir

    from towers.pipeline import train
    from twotower.config import config_dir

    overrides = [
        "experiment=quick",
        "trainer.max_epochs=6",
        "trainer.enable_progress_bar=false",
        "export.latest=null",
        f"paths.output_dir={work / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        result = train(compose(config_name="train", overrides=overrides))
    if result is None:
        raise RuntimeError("training the bundle failed")
    return Path(result.bundle)


def run(work: Path, bundle: Path, rounds: int, soak_seconds: float) -> dict[str, Any]:
    """Fault rounds then a soak run, each on a fresh state directory."""
    root = bundle_root(bundle, work / "bundles")
    rows = fault_rounds(root, work / "state-faults", rounds)
    soaked = soak(root, work / "state-soak", soak_seconds)
    return {"rounds": rows, "soak": soaked}


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("writes", "acknowledged", "events_found", "events_lost", "items_found", "items_lost")
    return {key: sum(int(r[key]) for r in rows) for key in keys}


def report(result: dict[str, Any], out: Path, command: str) -> str:
    rows, soaked = result["rounds"], result["soak"]
    summed = totals(rows)
    lines = [
        "# Reliability: fault injection and soak",
        "",
        f"Command: `{command}` (2 server workers, 4 writer threads, loopback, this machine).",
        "",
        "Each round writes events, items and removals with a token while one fault is "
        "injected: `kill_worker` (`kill -9` one uvicorn worker; uvicorn starts another, "
        "which replays the change log), `kill_server` (`kill -9` the whole process group, "
        "then `twotower serve` again on the same `state_dir`) or `lock_store` (another "
        "process holds SQLite's exclusive lock for 6.5 s, past the 5 s lock timeout). "
        "A write is *acknowledged* when it got a 2xx; `acknowledged` counts the distinct "
        "events and items so judged (an item's last acknowledged write is its state). "
        "Afterwards every acknowledged event is looked up in the store on disk, and every "
        "item through `POST /recommend` filtered on the round's category, on fresh "
        "connections so every worker answers: the live ones must all be served and the "
        "removed ones none. `workers_diverged`: workers whose `/readyz` catalogue size "
        "differs from another's. `refused_503`: writes answered 503 + Retry-After; "
        "`no_answer`: writes whose connection died with a killed worker or server. Neither "
        "is acknowledged, and an item whose write got no answer is not judged.",
        "",
        markdown_table(rows, ROUND_COLUMNS),
        "",
        f"Total: {summed['acknowledged']:,} writes acknowledged of {summed['writes']:,} "
        f"attempted; events found {summed['events_found']:,}, lost {summed['events_lost']}; "
        f"items found {summed['items_found']:,}, lost {summed['items_lost']}.",
        "",
        "## Soak",
        "",
        f"{soaked['seconds']:.0f} s of reads (`GET` and `POST /recommend`, 2 threads), writes "
        "(events, items, removals; 2 threads) and a reload every 2 s between two bundles, "
        f"{soaked['workers']} workers.",
        "",
        markdown_table([soaked], list(soaked)),
        "",
        "RSS is the server's processes together, sampled every second; bounded means the "
        "second half's peak is not above the first half's by more than the noise.",
        "",
        "## Also tested (tests/test_shared_state.py, in `.ci/run`)",
        "",
        "- the state file deleted while serving: writes get 503, readiness fails, and an "
        "item refused so is not served;",
        "- the store locked: 503 + Retry-After and not ready, then 200 once released;",
        "- reloads while items are written: every acknowledged item is served afterwards;",
        "- two workers writing the same items concurrently converge to the same catalogue;",
        "- a restarted worker replays every acknowledged write.",
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--soak-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/reliability"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = run(work, tiny_bundle(work), args.rounds, args.soak_seconds)
    command = (
        f"twotower bench reliability --rounds {args.rounds} --soak-seconds {args.soak_seconds:g}"
    )
    print(report(result, args.out, command))
