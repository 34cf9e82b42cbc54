"""`pytest bench`: the JSON's directory made up front; ratios between the providers of each group, computed from
this same run, into the JSON."""

import pytest
import torch
from measure import DEVICE, DTYPE, SIZE


def pytest_configure(config):
    """Create the directory `--benchmark-json` writes into (bench/results/ is not in a fresh clone) before anything
    runs: pytest-benchmark opens the file only after the last benchmark."""
    path = config.getoption("benchmark_json", None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


@pytest.hookimpl
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add to each benchmark `speedup_vs` (other provider's median / mine) and `memory_vs` (my peak memory / the
    other's) for every other provider of its group, and the run's context at the top level."""
    groups = {}
    for bench in output_json["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    for members in groups.values():
        for bench in members:
            mine = bench["extra_info"]
            others = [other for other in members if other is not bench]
            mine["speedup_vs"] = {o["extra_info"]["provider"]: o["stats"]["median"] / bench["stats"]["median"]
                                  for o in others}
            mine["memory_vs"] = {o["extra_info"]["provider"]: mine["peak_mb"] / o["extra_info"]["peak_mb"]
                                 for o in others if "peak_mb" in mine and o["extra_info"].get("peak_mb")}
    output_json["context"] = {
        "size": SIZE,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else cpu_name(output_json["machine_info"]),
        "dtype": str(DTYPE).removeprefix("torch."),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def cpu_name(machine_info: dict) -> str:
    cpu = machine_info.get("cpu", {})
    return f"{cpu.get('brand_raw', machine_info.get('machine', 'CPU'))}, {cpu.get('count', '?')} cores"
