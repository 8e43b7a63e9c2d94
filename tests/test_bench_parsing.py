"""The benchmark scripts' parsers and report writer (so the benchmarks cannot silently break)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import write_report
from benchmarks.serving import parse_wrk
from benchmarks.splits import split_summary

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8000
  2 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    1.20ms  40.00ms   90.00%
  Latency Distribution
     50%    2.90ms
     75%    3.40ms
     90%    4.10ms
     99%  812.00us
  12345 requests in 10.00s, 4.56MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   1234.50
Transfer/sec:    466.00KB
"""


def test_wrk_output_is_parsed() -> None:
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed == {
        "requests_per_s": 1234.5,
        "requests": 12345,
        "p50_ms": 2.9,
        "p99_ms": 0.812,
        "errors": 6,
    }


def test_report_writes_json_and_markdown(tmp_path: Path) -> None:
    write_report(tmp_path / "r", "Title", "Intro.", {"a": 1}, [{"x": 1.5, "y": "z"}], ["x", "y"])
    assert json.loads((tmp_path / "r.json").read_text())["results"] == [{"x": 1.5, "y": "z"}]
    assert "| 1.500 | z |" in (tmp_path / "r.md").read_text()


def test_split_summary_gives_mean_spread_and_every_split() -> None:
    runs = {
        42: [{"model": "a", "recall@20": 0.1}, {"model": "b", "recall@20": 0.3}],
        1: [{"model": "a", "recall@20": 0.3}],
    }
    columns, table = split_summary(runs, ["recall@20"])
    assert columns == [
        "model",
        "splits",
        "recall@20 mean",
        "recall@20 sd",
        "recall@20 s42",
        "recall@20 s1",
    ]
    a, b = table
    assert a["splits"] == 2 and abs(a["recall@20 mean"] - 0.2) < 1e-12
    assert abs(a["recall@20 sd"] - 0.1414213562) < 1e-9 and a["recall@20 s1"] == 0.3
    assert b == {
        "model": "b",
        "splits": 1,
        "recall@20 mean": 0.3,
        "recall@20 sd": 0.0,
        "recall@20 s42": 0.3,
    }
    with pytest.raises(ValueError, match="no split"):
        split_summary({}, ["recall@20"])
