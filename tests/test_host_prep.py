"""benchmarks/host_prep.py on tiny shapes: what it measures is what the layouts send (no O(tokens^2) tensor from the
host for the shared-prompt layout), and its table says it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import host_prep  # noqa: E402


def test_the_host_sends_the_shared_prompt_layout_in_linear_size(monkeypatch):
    monkeypatch.setattr(host_prep, "SHAPES", [("tiny", 2, 4, (20, 30), (40, 60))])
    results = host_prep.measure(repeats=1)
    by_layout = {r["layout"]: r for r in results}
    assert set(by_layout) == {"padded", "mask", "cache"}
    mask = by_layout["mask"]
    # one sequence per prompt of at most 30 + 4 x 61 tokens: every tensor sent is of that order, the mask built from
    # the ids (where they are) is its square
    length = 30 + 4 * 61
    assert mask["largest_tensor"] <= 2 * length < mask["mask_elements"] <= 2 * length * length
    assert "online_positions_s" in mask and "online_positions_s" not in by_layout["cache"]
    table = host_prep.table(results).splitlines()
    assert len(table) == 2 + 3 and table[2].split(" | ")[1:4:2] == ["padded", "1.00"]
