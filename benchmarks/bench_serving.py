"""Load test of GET /recommend at 100k items, 1 and 2 server workers, with wrk on loopback.

twotower bench serving [--items 100000 --seconds 10 --connections 1,4,16]
Needs wrk (Debian: apt-get install wrk). Writes docs/benchmarks/serving.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.retrieval import RetrievalBenchSettings, synthetic_bundle
from benchmarks.serving import load_test, start_server

# access control on, as a server on a network runs (one token, every scope)
TOKEN = "load-test-token"
COLUMNS = ["workers", "connections", "requests_per_s", "p50_ms", "p99_ms", "errors", "requests"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--index", default="IVF1024,Flat")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", default="1,4,16")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/serving"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    settings = RetrievalBenchSettings()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = synthetic_bundle(work / "bundle", args.items, args.index, settings)
        for workers in (int(w) for w in args.workers.split(",")):
            server, port = start_server(bundle, workers, work / f"serve-{workers}", TOKEN)
            try:
                for connections in (int(c) for c in args.connections.split(",")):
                    row = {
                        "workers": workers,
                        "connections": connections,
                        **load_test(port, settings.users, connections, args.seconds, work, TOKEN),
                    }
                    logging.info("%s", row)
                    rows.append(row)
            finally:
                server.terminate()
                server.wait(timeout=30)
    write_report(
        args.out,
        "Serving: GET /recommend under load",
        f"wrk on loopback against `twotower serve` (uvicorn), {args.items:,} synthetic items, "
        f"`{args.index}` tuned to ANN recall@100 ≥ 0.95, a random known user per request, k = 10, "
        f"{args.seconds} s per row (`twotower bench serving`), with access control on (a "
        "bearer token on every request). Target: no errors and "
        "p99 < 50 ms at the highest sustained rate reported.",
        {"items": args.items, "index": args.index, "seconds": args.seconds},
        rows,
        COLUMNS,
        "wrk shares the machine's cores with the server, so the rates are a floor. wrk's "
        "keep-alive connections stay with the worker that accepted them, and a shared "
        "listening socket does not balance them: with two workers the split of the "
        "connections between them (not the workers' capacity) can bound a row.",
    )
    print(args.out.with_suffix(".md").read_text())
