"""A converted model works with what users train with: transformers' Trainer, gradient
checkpointing, bf16 autocast, torch.compile (no graph breaks at our layers, no recompiles per
step), DDP and FSDP2 (2 CPU processes on gloo, the same result as one process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import spft_kernels as spft
from spft_kernels.integration.surgery import spft_layers, trainable_parameters

from tiny_models import hf_loss, one_thread, tiny_batches, tiny_model  # noqa: F401 (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # python_tests/
REPO = os.path.dirname(TESTS)


def converted(kind="llama", method="speft", dtype=torch.float32, **overrides):
    model = tiny_model(kind, dtype=dtype)
    batches = tiny_batches(kind)
    budget = {} if {"density", "num_params", "match_lora_rank"} & set(overrides) else {"density": 0.1}
    config = spft.SpftConfig(method=method, modules_to_save=["classifier"] if kind == "bert" else None,
                             **budget, **overrides)
    return spft.get_spft_model(model, config, batches, hf_loss), batches


def delta_grads(model):
    return {name: layer.delta.grad.clone() for name, layer in spft_layers(model).items()}


# --- transformers.Trainer ----------------------------------------------------------------------


def test_trainer_trains_only_the_deltas_and_checkpoints(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model, _ = converted()
    w0 = {name: spft.integration.surgery.plain_linear(layer).weight.detach().clone() for name, layer in spft_layers(model).items()}
    for layer in spft_layers(model).values():
        layer.merge()
    data = [{"input_ids": ids, "labels": ids} for ids in tiny_batches("llama", count=1, batch=8)[0]["input_ids"]]

    class SaveAdapter(transformers.TrainerCallback):
        """The recommended way to keep small checkpoints: an adapter file next to each one."""

        def on_save(self, args, state, control, model=None, **kwargs):
            spft.save_adapter(model, os.path.join(args.output_dir, f"adapter-{state.global_step}.safetensors"))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=2e-2,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1, save_strategy="steps",
        save_steps=12, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveAdapter()])
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(layer.delta) for layer in spft_layers(model).values()}
    assert sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"]) == \
        trainable_parameters(model)[0]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-2:]) < sum(losses[:2]) - 0.05, losses
    for name, layer in spft_layers(model).items():  # W0 itself never trained
        assert torch.equal(spft.integration.surgery.plain_linear(layer).weight, w0[name])
    # The Trainer's own checkpoint (the converted model's save_pretrained: its adapter folder, not W0)
    # loads back exactly, and so does the adapter the callback wrote.
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tmp_path / "checkpoint-12"))
    batch = tiny_batches("llama")[0]
    with torch.no_grad():
        expected = model(**batch).logits
    # The same layers with other positions: the adapter brings the trained positions along.
    resumed, _ = converted(method="sparta", density=0.3, scope="local", target_modules=list(spft_layers(model)))
    spft.load_adapter(resumed, tmp_path / "checkpoint-12")
    from_adapter = spft.load_adapter(tiny_model("llama", dtype=torch.float32), tmp_path / "adapter-12.safetensors")
    with torch.no_grad():
        assert torch.equal(resumed(**batch).logits, expected)
        assert torch.equal(from_adapter(**batch).logits, expected)


# --- gradient checkpointing and autocast --------------------------------------------------------------


@pytest.mark.parametrize("method", ["speft", "spruft"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    model, batches = converted(method=method, **({"match_lora_rank": 2} if method == "spruft" else {}))
    model.train()
    hf_loss(model, batches[0]).backward()
    plain = delta_grads(model)
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.model.gradient_checkpointing
    hf_loss(model, batches[0]).backward()
    checkpointed = delta_grads(model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


@pytest.mark.parametrize("method", ["speft", "spruft"])
def test_bf16_autocast_step_keeps_fp32_delta_gradients(method):
    model, batches = converted(method=method)
    with torch.no_grad():
        reference = hf_loss(model, batches[0]).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hf_loss(model, batches[0])
    loss.backward()
    assert abs(loss.item() - reference) < 0.05 * abs(reference)
    for layer in spft_layers(model).values():
        assert layer.delta.dtype == torch.float32 and layer.delta.grad.dtype == torch.float32
        assert torch.isfinite(layer.delta.grad).all()
    optimizer.step()
    assert any(bool(layer.delta.abs().sum() > 0) for layer in spft_layers(model).values())


# --- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "llama", "opt", "qwen2"])
def test_compile_has_no_graph_breaks_at_our_layers(kind):
    model = tiny_model(kind, dtype=torch.float32)
    batch = tiny_batches(kind)[0]
    torch._dynamo.reset()
    unconverted = torch._dynamo.explain(model)(**batch)
    spft.get_spft_model(model, spft.SpftConfig(method="sparta", density=0.1))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    ours = [str(r.reason) for r in explained.break_reasons if "spft_kernels" in "".join(map(str, r.user_stack))]
    assert not ours
    assert explained.graph_break_count <= unconverted.graph_break_count
    assert explained.graph_count <= unconverted.graph_count


@pytest.fixture(scope="module")
def compile_is_bitwise():
    """Whether torch.compile leaves the plain (unconverted) tiny Llama's gradients bitwise equal to
    eager. Version-dependent, and not about our layers: true with torch 2.14 / transformers 5.24;
    false with torch 2.11 / transformers 5.17 (the GPU machine's versions), where Dynamo's graph
    of the model alone (backend "eager" too) changes the last bits of 13 of its gradients."""
    import copy

    model = tiny_model("llama", dtype=torch.float32)
    reference = copy.deepcopy(model)
    batch = tiny_batches("llama")[0]
    torch._dynamo.reset()
    hf_loss(torch.compile(model, backend="aot_eager"), batch).backward()
    hf_loss(reference, batch).backward()
    return all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("method, mode", [("speft", "auto"), ("spruft", "auto"), ("speft", "fused")])
def test_compiled_training_equals_eager_without_recompiles(method, mode, compile_is_bitwise):
    import torch._dynamo.testing

    kwargs = {"match_lora_rank": 2} if method == "spruft" else {}
    kwargs["mode"] = mode
    model, batches = converted(method=method, **kwargs)
    reference, _ = converted(method=method, **kwargs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, reference)]
    for step in range(3):
        for run, optimizer in zip((compiled, reference), optimizers):
            loss = hf_loss(run, batches[step])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert counter.frame_count == 1  # one graph, traced once: no break, no recompile per step
    assert not torch._dynamo.utils.counters["graph_break"]
    for (name, a), b in zip(spft_layers(model).items(), spft_layers(reference).values()):
        assert a.merged == (mode != "fused"), name
        if compile_is_bitwise or mode == "fused":  # fused: W0 is never written, compiled or not
            assert torch.equal(a.weight, b.weight), name  # merged weights re-synced in the graph
        if compile_is_bitwise:
            assert torch.equal(a.delta, b.delta), name
        else:  # where compile changes the plain model's gradients (seen: 1.5e-7 on deltas of ~0.03)
            torch.testing.assert_close(a.delta, b.delta, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6, msg=name)


# --- DDP and FSDP2 (2 CPU processes, gloo) -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp2_missing() -> str:
    if not torch.distributed.is_available():
        return "torch is built without torch.distributed"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"torch.distributed.fsdp.fully_shard is not available: {error}"
    return ""


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """Both phases in one pair of processes (start-up, mostly imports, dominates the time)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("distributed")
    phases = "ddp" if _fsdp2_missing() else "ddp,fsdp2"
    path = os.pathsep.join(filter(None, [REPO, TESTS, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    port = str(_free_port())
    worker = os.path.join(TESTS, "distributed_worker.py")
    processes = [
        subprocess.Popen([sys.executable, worker, str(rank), "2", port, str(out_dir), phases],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=240)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return out_dir


def _check_parity(out_dir, phase):
    import distributed_worker as worker

    reference = worker.build(worker.REFERENCE_MODES[phase])
    reference_losses = worker.train(reference)
    losses = [json.loads((out_dir / f"{phase}_rank{rank}.json").read_text()) for rank in range(2)]
    # The two halves have the same number of tokens: their mean loss is the global batch's.
    for step, expected in enumerate(reference_losses):
        assert abs((losses[0][step] + losses[1][step]) / 2 - expected) < 1e-12
    trained = spft.load_adapter(tiny_model("llama", dtype=torch.float64), out_dir / f"{phase}.safetensors")
    for (name, ours), theirs in zip(spft_layers(reference).items(), spft_layers(trained).values()):
        assert torch.equal(ours.index, theirs.index), name
        torch.testing.assert_close(theirs.delta, ours.delta, rtol=1e-10, atol=1e-13, msg=name)


def test_ddp_two_processes_match_one_process(distributed_run):
    _check_parity(distributed_run, "ddp")


def test_fsdp2_two_processes_match_one_process(distributed_run):
    missing = _fsdp2_missing()
    if missing:
        pytest.skip(missing)
    _check_parity(distributed_run, "fsdp2")
