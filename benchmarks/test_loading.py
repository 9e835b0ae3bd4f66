"""Issue 13's acceptance for data loading, as a benchmark (not a unit test; ``pytest benchmarks/test_loading.py``,
about 20 s): loading a 400k-record JSON lines file grows resident memory by at most the file's size."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bench_loading import run  # noqa: E402


@pytest.mark.slow
def test_loading_400k_records_grows_memory_by_at_most_the_file_size():
    result = run(400_000)
    print(result)
    assert result["records"] == 400_000
    assert result["rss_growth"] <= result["file_bytes"], result
    assert result["peak_growth"] <= result["file_bytes"], result
