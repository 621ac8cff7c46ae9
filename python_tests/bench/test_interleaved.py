import json

import torch

from spft_kernels.bench import benchmark, interleaved


def test_block_providers_train_the_cases_budget_in_whole_blocks():
    case = dict(out_features=128, in_features=192, tokens=8, density=0.5, dtype="float32")
    providers = benchmark.build_providers(case, torch.device("cpu"))
    assert {"block-merged-reference", "block-split-reference"} <= set(providers)
    layer = providers["block-merged-reference"]()
    assert layer.block_size == (64, 64) and layer.num_blocks == 3  # round(0.5 * 128 * 192 / 4096)
    assert layer.mode == "merged" and providers["block-split-reference"]().mode == "split"


def test_interleaved_run_writes_spft_bench_records(tmp_path, capsys):
    args = ["--device", "cpu", "--shape", "128", "64", "--tokens", "16", "--density", "0.5", "--repeats", "2",
            "--warmup", "0", "--providers", "dense-full", "lora-peft", "block-merged-reference",
            "block-split-reference", "--output", str(tmp_path)]
    assert interleaved.main(args) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["provider"] for r in records] == ["dense-full", "lora-peft", "block-merged-reference", "block-split-reference"]
    for record in records:
        assert record["op"] == "linear_fwd_bwd" and record["median_ms"] > 0 and record["peak_mem_bytes"] > 0
        assert record["interleaved"] and record["ratio_vs_lora-peft"] > 0 and record["commit"]
    assert records[2]["trainable_params"] == 64 * 64  # round(0.5 * 128 * 64 / 4096) blocks
    assert "block-merged-reference" in capsys.readouterr().out


def test_end_to_end_block_method_matches_loras_budget_in_blocks():
    from spft_kernels.bench.e2e import run_e2e

    small = dict(hidden=64, intermediate=96, layers=1, heads=2, kv_heads=2, vocab=64, sequence=16, batch=2)
    records = run_e2e(torch.device("cpu"), torch.float32, steps=1, warmup=1, rank=32, spec=small,
                      methods=["lora-peft", "spft-blocks"])
    lora, blocks = records
    assert blocks["provider"] == "spft-blocks" and blocks["tokens_per_s"] > 0
    # 64x64 blocks, per layer round(32 (in + out) / 4096): 1 for the 64x64 attention projections
    # (4096 / 4096), 1 for the 96x64 / 64x96 MLP ones (5120 / 4096 = 1.25; a clipped block).
    assert blocks["trainable_params"] == 7 * 4096 and lora["trainable_params"] == 32 * (4 * 128 + 3 * 160)
