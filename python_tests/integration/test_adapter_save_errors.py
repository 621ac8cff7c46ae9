"""``save_adapter`` checks everything before it writes: NaN or ±inf values and values that do not
fit the file's dtype are a ValueError naming the layer and the value (never a silent inf), I/O failures are OSError
subclasses (users catch OSError), bytes paths work, and an existing read-only file is refused.
Whatever fails, no file is created or changed."""

import os
import re
import stat

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import spft_kernels as spft


def _model(kind="entries", value=0.5):
    torch.manual_seed(0)
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(6, 5)])})
    linear = model.layers[0]
    if kind == "entries":
        layer = spft.SparseDeltaLinear.from_linear(linear, torch.tensor([1, 8, 20]), name="layers.0")
    elif kind == "rows":
        layer = spft.RowSparseLinear.from_linear(linear, torch.tensor([0, 3]), name="layers.0")
    else:
        layer = spft.PSTLinear.from_linear(linear, 0.0, r1=1, r2=1, name="layers.0")
    model.layers[0] = layer
    with torch.no_grad():
        (layer.delta if kind != "pst" else layer.U).fill_(value)
    return model


def _files(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("kind", ["entries", "rows", "pst"])
@pytest.mark.parametrize("value, dtype", [(1e5, torch.float16), (-65520.0, torch.float16), (3.4e38, torch.bfloat16)])
def test_a_value_that_overflows_the_file_dtype_is_named(kind, value, dtype, tmp_path):
    model = _model(kind, value)
    label = "U" if kind == "pst" else "delta"
    message = re.escape(f"layer 'layers.0': {label}[0] = {value:.6g} does not fit {str(dtype)[6:]}")
    with pytest.raises(ValueError, match=message):
        spft.save_adapter(model, tmp_path / "a.safetensors", dtype=dtype)
    assert _files(tmp_path) == []


def test_values_that_fit_are_saved_as_they_are(tmp_path):
    model = _model(value=65504.0)
    path = spft.save_adapter(model, tmp_path / "a.safetensors", dtype=torch.float16)
    saved = safetensors.torch.load_file(path)["layers.0.delta"]
    assert saved.tolist() == [65504.0] * 3


@pytest.mark.parametrize("kind", ["entries", "rows", "pst"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("form", [dict(), dict(dtype=torch.bfloat16), dict(format="peft")])
def test_non_finite_values_are_refused_before_anything_is_written(kind, bad, form, tmp_path):
    if kind == "pst" and form.get("format") == "peft":
        pytest.skip("a SHiRA folder cannot hold PST at all (refused for that)")
    model = _model(kind)
    label = "U" if kind == "pst" else "delta"
    with torch.no_grad():
        getattr(model.layers[0], label).view(-1)[1] = bad  # the first bad value; another one after it
        getattr(model.layers[0], label).view(-1)[-1] = float("nan")
    named = "values" if form.get("format") == "peft" else label  # (SHiRA's flat entries: the same order here)
    message = re.escape(f"layer 'layers.0': {named}[1] = {bad} is not finite")
    with pytest.raises(ValueError, match=message + ".*nothing was written"):
        spft.save_adapter(model, tmp_path / "out", **form)
    assert _files(tmp_path) == []


def test_a_missing_directory_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        spft.save_adapter(_model(), tmp_path / "missing" / "a.safetensors")
    assert _files(tmp_path) == []


def test_a_write_failure_is_an_os_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    spft.save_adapter(_model(value=1.0), path)
    old = path.read_bytes()
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="could not write .*No space left"):
        spft.save_adapter(_model(value=2.0), path)
    assert path.read_bytes() == old
    assert _files(tmp_path) == ["a.safetensors"]


def test_bytes_and_pathlike_paths(tmp_path):
    model = _model()
    as_bytes = os.fsencode(str(tmp_path / "b.safetensors"))
    written = spft.save_adapter(model, as_bytes)
    assert written == str(tmp_path / "b.safetensors")
    spft.load_adapter(_model(value=0.0), as_bytes)
    with pytest.raises(FileNotFoundError, match=r"'/nonexistent/dir'"):  # no b'...' in the message
        spft.save_adapter(model, b"/nonexistent/dir/x.safetensors")
    with pytest.raises(ValueError, match="str, bytes or os.PathLike"):
        spft.save_adapter(model, 123)


def test_an_existing_read_only_file_is_not_overwritten(tmp_path):
    path = tmp_path / "a.safetensors"
    spft.save_adapter(_model(value=1.0), path)
    old = path.read_bytes()
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP)
    try:
        with pytest.raises(PermissionError, match="read-only; it is not overwritten"):
            spft.save_adapter(_model(value=2.0), path)
        assert path.read_bytes() == old
    finally:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    spft.save_adapter(_model(value=2.0), path)  # a writable file is overwritten (documented)
    assert path.read_bytes() != old


def test_a_directory_target_gets_the_default_file_name(tmp_path):
    written = spft.save_adapter(_model(), tmp_path)
    assert written == str(tmp_path / "spft_adapter.safetensors")


def test_the_peft_format_checks_the_same(tmp_path):
    with pytest.raises(ValueError, match=r"layer 'layers.0': values\[0\] = 100000 does not fit float16"):
        spft.save_adapter(_model(value=1e5), tmp_path / "peft", format="peft", dtype=torch.float16)
    assert _files(tmp_path) == []
    folder = spft.save_adapter(_model(), os.fsencode(str(tmp_path / "peft")), format="peft")
    assert folder == str(tmp_path / "peft")
    config = tmp_path / "peft" / "adapter_config.json"
    old = config.read_bytes()
    os.chmod(config, stat.S_IRUSR)
    try:
        with pytest.raises(PermissionError, match="adapter_config.json' exists and is read-only"):
            spft.save_adapter(_model(value=2.0), tmp_path / "peft", format="peft")
    finally:
        os.chmod(config, stat.S_IRUSR | stat.S_IWUSR)
    assert config.read_bytes() == old


def test_a_spft_folder_with_a_read_only_config_is_refused_before_the_tensors_are_written(tmp_path):
    spft.save_adapter(_model(value=1.0), tmp_path / "folder")
    tensors = tmp_path / "folder" / "spft_adapter.safetensors"
    old = tensors.read_bytes()
    os.chmod(tmp_path / "folder" / "adapter_config.json", stat.S_IRUSR)
    try:
        with pytest.raises(PermissionError):
            spft.save_adapter(_model(value=2.0), tmp_path / "folder")
    finally:
        os.chmod(tmp_path / "folder" / "adapter_config.json", stat.S_IRUSR | stat.S_IWUSR)
    assert tensors.read_bytes() == old


def test_temporary_files_are_unpredictable_and_never_follow_a_planted_symlink(tmp_path):
    # The old temporary name, <target>.tmp-<pid>, planted as a symlink to a file of the user's:
    # every file of every layout is written beside it without touching the victim.
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    model, pid = _model(), os.getpid()
    spft_file, folder, peft_folder = tmp_path / "a.safetensors", tmp_path / "folder", tmp_path / "peft"
    folder.mkdir()
    peft_folder.mkdir()
    targets = [spft_file, folder / "spft_adapter.safetensors", folder / "adapter_config.json",
               peft_folder / "adapter_model.safetensors", peft_folder / "adapter_config.json"]
    for target in targets:
        os.symlink(victim, f"{target}.tmp-{pid}")
    spft.save_adapter(model, spft_file)
    spft.save_adapter(model, folder)
    spft.save_adapter(model, peft_folder, format="peft")
    assert victim.read_text() == "keep me"
    mask = os.umask(0o022)
    os.umask(mask)
    for target in targets:
        assert stat.S_ISREG(os.lstat(target).st_mode), target  # a file of its own, not the symlink renamed
        if target.suffix == ".json":  # as a plain open() makes it (safetensors makes its files 0o600 itself)
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~mask
        os.remove(f"{target}.tmp-{pid}")
    assert _files(tmp_path) == ["a.safetensors", "folder", "peft", "victim"]  # no temporary file left
    assert _files(folder) == ["adapter_config.json", "spft_adapter.safetensors"]
    assert _files(peft_folder) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(spft.load_adapter(_model(value=0.0), folder).layers[0].delta, model.layers[0].delta)
