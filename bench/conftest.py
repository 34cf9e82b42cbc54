"""Shared pieces of `pytest bench`: sizes per device, and ratios against the baselines computed in one run."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.hookimpl
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add to each benchmark its speed relative to the other providers of its group, from this same run."""
    groups = {}
    for bench in output_json["benchmarks"]:
        groups.setdefault(bench["group"], {})[bench["extra_info"].get("provider")] = bench["stats"]["median"]
    for bench in output_json["benchmarks"]:
        medians = groups[bench["group"]]
        mine = bench["stats"]["median"]
        bench["extra_info"]["speedup_vs"] = {p: m / mine for p, m in medians.items() if p and p != bench["extra_info"].get("provider")}
