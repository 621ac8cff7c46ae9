import json

from spft_kernels.bench import benchmark
from spft_kernels.bench import report as bench_report

REQUIRED_FIELDS = {
    "op", "provider", "out_features", "in_features", "tokens", "density", "dtype", "median_ms",
    "peak_mem_bytes", "ops_per_call", "device", "torch", "triton", "commit", "date",
}
ARGS = ["--device", "cpu", "--shape", "96", "80", "--tokens", "32", "--density", "0.05", "--repeats", "2", "--warmup", "1"]


def test_spft_bench_runs_and_writes_records_summary_and_plots(tmp_path, capsys):
    assert benchmark.main(ARGS + ["--output", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())
    providers = {r["provider"] for r in records}
    lora = "lora-peft" if "lora-peft" in providers else "lora-torch"
    assert {"dense-frozen", "dense-full", lora, "naive-sparse", "spft-merged-reference", "spft-split-reference",
            "spruft-merged-reference", "spruft-split-reference"} <= providers
    assert {r["op"] for r in records} == {"linear_fwd", "linear_bwd", "linear_fwd_bwd", "sddmm", "spmm"}
    baseline = {"sddmm": "dense-full", "spmm": "dense-frozen"}
    for record in records:
        assert REQUIRED_FIELDS <= set(record), REQUIRED_FIELDS - set(record)
        assert record["median_ms"] > 0 and record["peak_mem_bytes"] > 0 and record["ops_per_call"] > 0
        assert record[f"ratio_vs_{baseline.get(record['op'], 'dense-frozen')}"] > 0
    kernel_providers = {(r["op"], r["provider"]) for r in records if r["op"] in baseline}
    assert {("sddmm", "dense-full"), ("sddmm", "spft-row-blocks-reference"), ("spmm", "dense-frozen"),
            ("spmm", "spft-csr-reference"), ("spmm", "spft-csc-reference")} <= kernel_providers
    by_provider = {r["provider"]: r for r in records if r["op"] == "linear_fwd_bwd"}
    # equal trainable parameters, to within one LoRA rank step
    assert abs(by_provider["spft-split-reference"]["trainable_params"] - by_provider[lora]["trainable_params"]) <= 96 + 80
    assert by_provider["dense-frozen"]["trainable_params"] == 0
    assert "spft-merged-reference" in table and "dense-frozen" in table
    summary = (tmp_path / "summary.md").read_text()
    assert "| linear_fwd_bwd | 96×80 |" in summary and records[0]["commit"] in summary
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())


def test_spft_bench_runs_only_the_chosen_providers_ops_and_densities(tmp_path, capsys):
    args = ARGS[:ARGS.index("--density")] + ["--density", "0.01", "0.3", "--repeats", "1", "--warmup", "0"]
    chosen = ["dense-full", "spft-merged-reference", "spft-row-blocks-reference"]
    assert benchmark.main(args + ["--providers", *chosen, "--ops", "linear_fwd_bwd", "sddmm", "--output", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {(r["op"], r["provider"], r["density"]) for r in records} == {
        (op, provider, density) for density in (0.01, 0.3) for op, provider in
        [("linear_fwd_bwd", "dense-full"), ("linear_fwd_bwd", "spft-merged-reference"), ("sddmm", "dense-full"),
         ("sddmm", "spft-row-blocks-reference")]}
    # the dense GEMM is one op; a step's op count is in the table next to its time
    assert {r["ops_per_call"] for r in records if r["op"] == "sddmm" and r["provider"] == "dense-full"} == {1}
    assert " ops " in capsys.readouterr().out


def test_append_jsonl_keeps_each_case_as_it_finishes_with_host_time(tmp_path, monkeypatch):
    """--append-jsonl writes a case's records when that case is done: a run killed in its second
    case keeps the first (the GPU session's bench stage); --report reads the JSON lines."""
    path = tmp_path / "bench.jsonl"
    args = ARGS[:ARGS.index("--density")] + ["--density", "0.01", "0.3", "--repeats", "1", "--warmup", "0",
                                             "--providers", "dense-full", "--ops", "linear_fwd_bwd", "sddmm"]
    real_run_kernel_case, calls = benchmark.run_kernel_case, []

    def killed_in_the_second_case(case, *rest):
        calls.append(case["density"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a SIGTERM/SIGKILL cuts short
        return real_run_kernel_case(case, *rest)

    monkeypatch.setattr(benchmark, "run_kernel_case", killed_in_the_second_case)
    try:
        benchmark.main(args + ["--append-jsonl", str(path)])
    except KeyboardInterrupt:
        pass
    records = benchmark.load_records(str(path))
    # the first case whole, the second case's layer records (written before its kernel ops ran)
    assert [(r["op"], r["density"]) for r in records] == [
        ("linear_fwd_bwd", 0.01), ("sddmm", 0.01), ("linear_fwd_bwd", 0.3)]
    assert all(r["host_ms"] > 0 and r["median_ms"] > 0 for r in records)
    assert benchmark.main(["--report", str(path)]) == 0 and (tmp_path / "summary.md").exists()


def test_report_regenerates_from_json_and_compare_matches_cases(tmp_path, capsys):
    benchmark.main(ARGS + ["--output", str(tmp_path)])
    (tmp_path / "summary.md").unlink()
    assert benchmark.main(["--report", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "summary.md").exists()
    records = json.loads((tmp_path / "results.json").read_text())
    slower = [dict(r, median_ms=r["median_ms"] * 2) for r in records]
    comparison = bench_report.format_comparison(records, slower).splitlines()
    ratios = [line.split()[-1] for line in comparison[4:]]  # after the title, header and rule lines
    assert len(ratios) == len(records) and set(ratios) == {"0.50"}


def test_end_to_end_training_comparison_runs_with_matched_parameters():
    import torch

    from spft_kernels.bench.e2e import format_e2e, run_e2e

    tiny = dict(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=2, vocab=64, sequence=16, batch=2)
    records = run_e2e(torch.device("cpu"), torch.float32, steps=1, warmup=1, rank=2, spec=tiny,
                      methods=["full", "lora-peft", "spft-sparta", "spft-speft", "spruft"])
    by_method = {r["provider"]: r for r in records}
    assert set(by_method) == {"full", "lora-peft", "spft-sparta", "spft-speft", "spruft"}
    # whole rows: the same budget up to rounding to rows of in_features entries
    assert abs(by_method["spruft"]["trainable_params"] - by_method["lora-peft"]["trainable_params"]) <= 7 * 64
    assert by_method["spft-sparta"]["trainable_params"] == by_method["lora-peft"]["trainable_params"]
    assert by_method["spft-speft"]["trainable_params"] == by_method["lora-peft"]["trainable_params"]
    assert by_method["full"]["trainable_params"] == by_method["full"]["parameters"]
    for record in records:
        assert record["tokens_per_s"] > 0 and record["peak_mem_bytes"] > 0
        assert torch.isfinite(torch.tensor(record["final_loss"]))
    assert "spft-sparta" in format_e2e(records)
    assert "## End to end" in bench_report.format_e2e_markdown(records)
