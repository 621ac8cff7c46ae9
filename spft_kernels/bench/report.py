"""spft-bench results: ratios to the baselines, the terminal table, the markdown summary, the
plots (regenerated from the JSON alone) and the comparison with an earlier run."""

from __future__ import annotations

import json
import os
from collections import defaultdict

BASELINES = ("dense-frozen", "dense-full", "lora-peft", "lora-torch", "shira-peft")
CASE_KEYS = ("op", "out_features", "in_features", "tokens", "density", "dtype")


def _case(record: dict) -> tuple:
    return tuple(record[key] for key in CASE_KEYS)


def add_ratios(records: list[dict]) -> None:
    """``ratio_vs_<baseline>`` (time) and ``mem_ratio_vs_<baseline>`` for every record."""
    by_case = defaultdict(dict)
    for record in records:
        by_case[_case(record)][record["provider"]] = record
    for record in records:
        for baseline in BASELINES:
            reference = by_case[_case(record)].get(baseline)
            if reference and reference["median_ms"] > 0:
                record[f"ratio_vs_{baseline}"] = record["median_ms"] / reference["median_ms"]
                record[f"mem_ratio_vs_{baseline}"] = record["peak_mem_bytes"] / reference["peak_mem_bytes"]


def _shape(record: dict) -> str:
    return f"{record['out_features']}x{record['in_features']}"


def _lora_baseline(records: list[dict]) -> str:
    return "lora-peft" if any(r["provider"] == "lora-peft" for r in records) else "lora-torch"


def format_table(records: list[dict]) -> str:
    records = layer_records(records)
    lora = _lora_baseline(records)
    header = (
        f"{'op':<15}{'shape':>12}{'tokens':>7}{'density':>8}{'provider':>27}{'trainable':>10}{'ms':>10}"
        f"{'host ms':>9}{'ops':>6}{'x frozen':>9}{'x full':>8}{'x ' + lora:>14}{'peak MiB':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        frozen, full, vs_lora = (r.get(f"ratio_vs_{b}") for b in ("dense-frozen", "dense-full", lora))
        host = f"{r['host_ms']:.3f}" if "host_ms" in r else "-"  # launch-bound when it nears ms on a GPU
        lines.append(
            f"{r['op']:<15}{_shape(r):>12}{r['tokens']:>7}{r['density']:>8.3g}"
            f"{r['provider']:>27}{r['trainable_params']:>10}{r['median_ms']:>10.3f}"
            f"{host:>9}{r.get('ops_per_call', '-'):>6}"
            f"{(f'{frozen:.2f}' if frozen else '-'):>9}{(f'{full:.2f}' if full else '-'):>8}"
            f"{(f'{vs_lora:.2f}' if vs_lora else '-'):>14}"
            f"{r['peak_mem_bytes'] / 2**20:>10.1f}"
        )
    return "\n".join(lines)


def format_markdown(records: list[dict]) -> str:
    if not records:
        return "# spft-bench\n\nNo records.\n"
    first = records[0]
    lora = _lora_baseline(records)
    lines = [
        "# spft-bench results",
        "",
        f"Device: {first['device']}; torch {first['torch']}, triton {first.get('triton')}, CUDA {first.get('cuda')}, "
        f"peft {first.get('peft')}; commit `{first['commit']}`; {first['date']}. Median of {first['repeats']} "
        "repeats; ratios are this provider's time (or peak memory) over the baseline's on the same case; "
        "ops: the ops one call launches.",
        "",
        f"| op | shape | tokens | density | dtype | provider | trainable | ms | ops | TFLOP/s | × dense-frozen "
        f"| × dense-full | × {lora} | peak MiB | mem × {lora} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(record, key):
        value = record.get(key)
        return f"{value:.2f}" if value else "-"

    for r in records:
        tflops = f"{r['tflops']:.2f}" if r.get("tflops") else "-"
        lines.append(
            f"| {r['op']} | {r['out_features']}×{r['in_features']} | {r['tokens']} | {r['density']:g} | {r['dtype']} "
            f"| {r['provider']} | {r['trainable_params']} | {r['median_ms']:.3f} | {r.get('ops_per_call', '-')} | {tflops} "
            f"| {ratio(r, 'ratio_vs_dense-frozen')} | {ratio(r, 'ratio_vs_dense-full')} | {ratio(r, f'ratio_vs_{lora}')} "
            f"| {r['peak_mem_bytes'] / 2**20:.1f} | {ratio(r, f'mem_ratio_vs_{lora}')} |"
        )
    return "\n".join(lines) + "\n"


def format_comparison(records: list[dict], earlier: list[dict]) -> str:
    """This run's time against an earlier run's, case by case (new / old; < 1 is faster)."""
    records, earlier = layer_records(records), layer_records(earlier)
    old = {(_case(r), r["provider"]): r for r in earlier}
    header = f"{'op':<15}{'shape':>12}{'tokens':>7}{'density':>8}{'provider':>27}{'old ms':>10}{'new ms':>10}{'new/old':>9}"
    lines = ["", f"compared with {earlier[0]['commit'][:12] if earlier else '?'} on {earlier[0]['device'] if earlier else '?'}",
             header, "-" * len(header)]
    for r in records:
        before = old.get((_case(r), r["provider"]))
        if before is None:
            continue
        lines.append(
            f"{r['op']:<15}{_shape(r):>12}{r['tokens']:>7}{r['density']:>8.3g}"
            f"{r['provider']:>27}{before['median_ms']:>10.3f}{r['median_ms']:>10.3f}"
            f"{r['median_ms'] / before['median_ms']:>9.2f}"
        )
    return "\n".join(lines)


def write_plots(records: list[dict], directory: str) -> list[str]:
    """Time vs density per shape (forward+backward) and peak memory per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fwd_bwd = [r for r in records if r["op"] == "linear_fwd_bwd"]
    shapes = sorted({(r["out_features"], r["in_features"], r["tokens"], r["dtype"]) for r in fwd_bwd})
    for out_features, in_features, tokens, dtype in shapes:
        subset = [r for r in fwd_bwd if (r["out_features"], r["in_features"], r["tokens"], r["dtype"]) ==
                  (out_features, in_features, tokens, dtype)]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for provider in sorted({r["provider"] for r in subset}):
            points = sorted((r["density"], r["median_ms"]) for r in subset if r["provider"] == provider)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        axis.set_xscale("log")
        axis.set_xlabel("density")
        axis.set_ylabel("forward+backward, ms (median)")
        axis.set_title(f"{out_features}×{in_features}, {tokens} tokens, {dtype}")
        axis.legend(fontsize=7)
        axis.grid(True, alpha=0.3)
        path = os.path.join(directory, f"time_vs_density_{out_features}x{in_features}_t{tokens}_{dtype}.png")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    if fwd_bwd:
        # memory per provider, each on the largest case of the run
        largest = max(fwd_bwd, key=lambda r: (r["out_features"] * r["in_features"], r["tokens"], r["density"]))
        subset = [r for r in fwd_bwd if _case(r) == _case(largest)]
        figure, axis = plt.subplots(figsize=(7, 4.5))
        axis.barh([r["provider"] for r in subset], [r["peak_mem_bytes"] / 2**20 for r in subset])
        axis.set_xlabel("peak memory of forward+backward, MiB")
        axis.set_title(f"{largest['out_features']}×{largest['in_features']}, {largest['tokens']} tokens, "
                       f"density {largest['density']:g}, {largest['dtype']}")
        figure.tight_layout()
        path = os.path.join(directory, "memory_per_provider.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def layer_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r["op"] != "e2e_step"]


def format_e2e_markdown(records: list[dict]) -> str:
    e2e = [r for r in records if r["op"] == "e2e_step"]
    if not e2e:
        return ""
    lines = [
        "",
        f"## End to end: {e2e[0]['model']}, {e2e[0]['tokens']} tokens per step, {e2e[0]['dtype']}, "
        f"trainable parameters matched to LoRA rank {e2e[0]['lora_rank_matched']}",
        "",
        "| method | trainable | step ms | tokens/s | peak MiB | loss after the steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in e2e:
        lines.append(
            f"| {r['provider']} | {r['trainable_params']} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['peak_mem_bytes'] / 2**20:.1f} | {r['final_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(records: list[dict], directory: str) -> list[str]:
    """results.json, summary.md and the plots into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, "results.json")
    with open(json_path, "w") as handle:
        json.dump(records, handle, indent=1)
    summary_path = os.path.join(directory, "summary.md")
    with open(summary_path, "w") as handle:
        handle.write(format_markdown(layer_records(records)) + format_e2e_markdown(records))
    return [json_path, summary_path] + write_plots(layer_records(records), directory)
