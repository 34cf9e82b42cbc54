"""Render the JSON of `pytest bench --benchmark-json FILE` as a markdown table and a PNG plot.

    python bench/render.py bench/results/cpu.json     # writes bench/results/cpu.md and bench/results/cpu.png

Both land next to the JSON unless `--markdown` / `--plot` name other files; the published CPU results are rendered
from the JSON of an idle machine's run with `--markdown bench/cpu_results.md --plot bench/cpu_results.png`.

The table has one block of rows per benchmark group: each provider's median, its derived figures, its time and peak
memory relative to the group's baseline, and, where a benchmark names one, its time relative to a reference.
The plot draws each sweep (the decode step against the K/V cache length): time and peak memory per provider.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import NullLocator  # noqa: E402

FIGURES = (  # extra_info key, column header, format
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("kv_gb_per_s", "K/V GB/s", "{:.3g}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("peak_mb", "peak MB", "{:,.1f}"),
    ("host_us", "host µs/call", "{:.1f}"),
    ("kernel_us", "kernel µs/call", "{:.1f}"),
)


def by_group(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """Benchmarks per group, in the order they ran, the op's groups before the model's."""
    groups = {}
    for bench in benchmarks:
        groups.setdefault(bench["group"], []).append(bench)
    return dict(sorted(groups.items(), key=lambda item: item[0].startswith("model")))


def duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def interleaved(info: dict, other: str | None, invert: bool = False) -> str:
    """"; I x interleaved" where the group was also timed in interleaved rounds, else ""."""
    ratio = info.get("interleaved_vs", {}).get(other)
    return "" if ratio is None else f"; {1 / ratio if invert else ratio:.3g}x interleaved"


def relative(info: dict, key: str, suffix: str) -> str:
    if info["provider"] == info["baseline"]:
        return "baseline"
    ratio = info[key].get(info["baseline"])
    if ratio is None:
        return ""
    return f"{ratio:.3g}{suffix}" + (interleaved(info, info["baseline"]) if key == "speedup_vs" else "")


def against_reference(info: dict) -> str:
    ratio = info["speedup_vs"].get(info.get("reference"))
    if ratio is None:
        return ""
    return f"{1 / ratio:.3g}x {info['reference']}" + interleaved(info, info["reference"], invert=True)


LEGEND = """\
- speed-up vs baseline: the baseline's median over this one's; peak memory vs baseline: this one's peak over the
  baseline's. The baseline is PEFT's path (`materialised` for the op, `peft`, `peft padded` or `peft_cache` for the
  model) under the same condition, a single adapter for the adapter bank, and for the host overhead groups SDPA
  on the sequence keys alone (`sdpa`) or the model with no prefix.
- host µs/call: per call of a round of back-to-back calls; on CUDA the host's time to issue one call, beside the
  GPU's own (kernel µs/call).
- time vs reference: this median over the named provider's: the model with no prefix (what the prefix itself
  costs), or the same provider on an idle machine (what one busy competitor process costs).
- tokens/s: real (non-padding) tokens per second; for generation, the new tokens.
- interleaved: the same ratio from rounds that time every provider of the group once each, round-robin, so a
  drift of the machine's speed moves them alike (the model groups; their medians time one provider after
  another).
"""


def summary(data: dict) -> str:
    context = data.get("context", {})
    return (f"{context.get('size', '?')} sizes, {context.get('dtype', '?')}, {context.get('device', '?')}, "
            f"torch {context.get('torch', '?')}, {data['datetime'][:10]}; medians")


def table(data: dict) -> str:
    header = ["case", "provider", "median", *(title for _, title, _ in FIGURES), "speed-up vs baseline",
              "peak memory vs baseline", "time vs reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for group, members in by_group(data["benchmarks"]).items():
        for i, bench in enumerate(members):
            info = bench["extra_info"]
            figures = [fmt.format(info[key]) if key in info else "" for key, _, fmt in FIGURES]
            row = [group if i == 0 else "", info["provider"], duration(bench["stats"]["median"]), *figures,
                   relative(info, "speedup_vs", "x"), relative(info, "memory_vs", "x"), against_reference(info)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def sweeps(data: dict) -> dict[str, dict[str, list[tuple]]]:
    """sweep label -> provider -> [(x, median ms, peak MB)] of the benchmarks that belong to a sweep."""
    found = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "sweep" in info:
            points = found.setdefault(info["sweep"], {}).setdefault(info["provider"], [])
            points.append((info["x"], bench["stats"]["median"] * 1e3, info["peak_mb"]))
    return found


def plot(drawn: dict[str, dict[str, list[tuple]]], title: str, path: Path) -> None:
    """Time and peak memory of each provider along each of `drawn`'s sweeps, one row of two panels per sweep."""
    fig, axes = plt.subplots(len(drawn), 2, figsize=(11, 4.2 * len(drawn)), squeeze=False)
    for (label, providers), (time_ax, memory_ax) in zip(drawn.items(), axes, strict=True):
        for provider, points in providers.items():
            xs, times, peaks = zip(*sorted(points), strict=True)
            time_ax.plot(xs, times, marker="o", label=provider)
            memory_ax.plot(xs, peaks, marker="o", label=provider)
        for ax, unit in ((time_ax, "median time (ms)"), (memory_ax, "peak MB allocated during the call")):
            ax.set(xscale="log", yscale="log", xlabel=label, ylabel=unit)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(True, which="both", alpha=0.3)
        time_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON written by pytest --benchmark-json")
    parser.add_argument("--markdown", type=Path, help="write the table here (default: next to the JSON, .md)")
    parser.add_argument("--plot", type=Path, help="write the PNG plot here (default: next to the JSON, .png, when the "
                                                  "results hold a sweep)")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    markdown = args.markdown or args.results.with_suffix(".md")
    markdown.write_text(f"{summary(data)}.\n\n{table(data)}\n{LEGEND}")
    print(f"wrote {markdown}")
    drawn = sweeps(data)
    if args.plot is not None and not drawn:
        raise SystemExit("--plot: no sweep in these results (the op suite, bench/test_op.py, has one)")
    if drawn:
        path = args.plot or args.results.with_suffix(".png")
        plot(drawn, summary(data), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
