"""Op microbenchmarks through pytest-benchmark: `pytest --benchmark-only tests/benchmarks`.

They are skipped by the normal test run (timing is not testing) and run when pytest-benchmark is
asked to (`--benchmark-only` or `--benchmark-enable`), so commits compare with its own tooling:
`pytest --benchmark-only --benchmark-autosave`, then `pytest-benchmark compare`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _benchmarking(config: pytest.Config) -> bool:
    opt = config.getoption
    return bool(opt("benchmark_only", False) or opt("benchmark_enable", False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _benchmarking(config):
        return
    skip = pytest.mark.skip(reason="microbenchmark: run with pytest --benchmark-only")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
