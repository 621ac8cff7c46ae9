import json

from spft_kernels import benchmark

REQUIRED_FIELDS = {
    "op", "provider", "out_features", "in_features", "tokens", "density", "dtype", "median_ms",
    "peak_mem_bytes", "device", "torch", "triton", "commit", "date",
}


def test_spft_bench_runs_and_writes_records(tmp_path, capsys):
    output = tmp_path / "results.json"
    args = ["--device", "cpu", "--shape", "96", "80", "--tokens", "32", "--density", "0.05", "--repeats", "2",
            "--warmup", "1", "--output", str(output)]
    assert benchmark.main(args) == 0
    table = capsys.readouterr().out
    records = json.loads(output.read_text())
    providers = {r["provider"] for r in records}
    assert {"dense-frozen", "dense-full", "lora-torch", "spft-merged-reference", "spft-split-reference"} <= providers
    assert {r["op"] for r in records} == {"linear_fwd", "linear_fwd_bwd"}
    for record in records:
        assert REQUIRED_FIELDS <= set(record), REQUIRED_FIELDS - set(record)
        assert record["median_ms"] > 0 and record["peak_mem_bytes"] > 0
    spft_record = next(r for r in records if r["provider"] == "spft-split-reference")
    lora_record = next(r for r in records if r["provider"] == "lora-torch")
    # equal trainable parameters, to within one LoRA rank step
    assert abs(spft_record["trainable_params"] - lora_record["trainable_params"]) <= 96 + 80
    assert "spft-merged-reference" in table and "dense-frozen" in table
