"""Checkpoints: own-format round trip, every foreign form, trust rules, mismatches, corrupt files."""

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from landscape.checkpoint import FORMAT, file_sha256, load_checkpoint, save_checkpoint
from landscape.errors import LandscapeError
from landscape.models import build_model

ARCH_KWARGS = {"num_classes": 10, "input_shape": (1, 8, 8), "width": 4}


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = build_model("cnn", **ARCH_KWARGS)
    with torch.no_grad():  # non-trivial BN buffers, so they must round-trip too
        model(torch.randn(8, 1, 8, 8))
        for buffer in model.buffers():
            buffer.add_(1)
    return model.eval()


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    reference, loaded = expected.state_dict(), actual.state_dict()
    assert list(reference) == list(loaded)
    for key in reference:
        assert torch.equal(reference[key], loaded[key]), key
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(actual(x), expected.eval()(x), rtol=0, atol=0)


def save_own(path, model, **overrides):
    arguments = dict(arch="cnn", arch_kwargs=ARCH_KWARGS, dataset="digits", optimizer="sam",
                     optimizer_hparams={"lr": np.float64(0.1), "rho": 0.05, "betas": (0.9, 0.999)},
                     metrics={"test_accuracy": np.float32(0.5), "history": np.array([1.0, 0.5])}, seed=3)
    save_checkpoint(path, model, **{**arguments, **overrides})


def test_own_format_round_trip_rebuilds_from_the_file_alone(tmp_path, model):
    path = tmp_path / "runs" / "own.pt"
    save_own(path, model, extra={"epochs": 2})
    assert [p.name for p in path.parent.iterdir()] == ["own.pt"], "temporary file left behind"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["seed"] == 3 and raw["optimizer"] == "sam"
    assert set(raw["versions"]) == {"landscape", "torch", "python"} and raw["versions"]["torch"] == torch.__version__
    checkpoint = load_checkpoint(path)
    assert_same_weights(model, checkpoint.model)
    assert not checkpoint.model.training
    meta = checkpoint.meta
    assert meta["arch"] == "cnn" and meta["arch_kwargs"]["input_shape"] == (1, 8, 8) and meta["dataset"] == "digits"
    assert meta["optimizer_hparams"] == {"lr": 0.1, "rho": 0.05, "betas": (0.9, 0.999)}
    assert type(meta["optimizer_hparams"]["lr"]) is float
    assert meta["metrics"] == {"test_accuracy": 0.5, "history": [1.0, 0.5]} and meta["extra"] == {"epochs": 2}
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)


def test_unstorable_metadata_is_refused_and_keeps_the_old_file(tmp_path, model):
    path = tmp_path / "own.pt"
    save_own(path, model)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metrics holds a object"):
        save_own(path, model, metrics={"bad": object()})
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_newer_own_format_is_refused(tmp_path, model):
    path = tmp_path / "future.pt"
    torch.save({"format": "landscape-checkpoint/99", "state_dict": model.state_dict()}, path)
    with pytest.raises(LandscapeError, match="upgrade landscape"):
        load_checkpoint(path)


def prefixed(state, prefix):
    return {prefix + key: value for key, value in state.items()}


FOREIGN = {
    "bare": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 7, "arch": "something"},
    "model": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "model_state_dict": lambda s: {"model_state_dict": s},
    "state_dict_ema": lambda s: {"state_dict_ema": s},
    "module.": lambda s: prefixed(s, "module."),
    "_orig_mod.": lambda s: {"state_dict": prefixed(s, "_orig_mod.")},
    "compiled DataParallel": lambda s: prefixed(s, "module._orig_mod."),
}


@pytest.mark.parametrize("form", FOREIGN)
def test_foreign_forms_load_with_arch(tmp_path, model, form):
    path = tmp_path / "foreign.pth"
    torch.save(FOREIGN[form](model.state_dict()), path)
    checkpoint = load_checkpoint(path, arch="cnn", arch_kwargs={"width": 4})
    assert_same_weights(model, checkpoint.model)
    assert checkpoint.meta["arch"] == "cnn"


def test_plain_state_dict_is_preferred_to_ema(tmp_path, model):
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in model.state_dict().items()}
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema}, tmp_path / "both.pt")
    assert_same_weights(model, load_checkpoint(tmp_path / "both.pt", arch="cnn", arch_kwargs={"width": 4}).model)


def test_safetensors(tmp_path, model):
    path = tmp_path / "weights.safetensors"
    save_file(prefixed(model.state_dict(), "module."), str(path))
    checkpoint = load_checkpoint(path, arch="cnn", arch_kwargs={"width": 4})
    assert_same_weights(model, checkpoint.model)
    assert checkpoint.meta["format"] == "safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(LandscapeError, match="corrupt"):
        load_checkpoint(path, arch="cnn", arch_kwargs={"width": 4})


def test_foreign_weights_need_arch(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(LandscapeError, match="--arch"):
        load_checkpoint(tmp_path / "weights.pt")


def test_old_checkpoints_without_bn_counters_load(tmp_path, model):
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt", arch="cnn", arch_kwargs={"width": 4}).model
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path, model):
    state = dict(model.state_dict())
    del state["0.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["12.weight"] = torch.zeros(5, 4 * 16)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(LandscapeError) as error:
        load_checkpoint(tmp_path / "bad.pt", arch="cnn", arch_kwargs={"width": 4})
    message = str(error.value)
    print(message)
    assert "\n" not in message
    assert "1 missing key(s): 0.weight" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "1 wrongly shaped key(s): 12.weight (file [5, 64] vs model [10, 64])" in message
    assert "--arch-kwargs" in message


def test_mismatch_shows_only_the_first_few_offenders(tmp_path):
    resnet = build_model("resnet18", input_shape=(1, 8, 8), width=2)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(LandscapeError) as error:
        load_checkpoint(tmp_path / "resnet.pt", arch="cnn")
    message = str(error.value)
    print(message)
    missing = [key for key in build_model("cnn").state_dict() if not key.endswith("num_batches_tracked")]
    unexpected = list(resnet.state_dict())
    assert f"{len(missing)} missing key(s): {', '.join(missing[:5])}, ...;" in message
    assert f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}, ...;" in message
    assert unexpected[5] not in message and "wrongly shaped" not in message


def test_pickled_module_needs_trust(tmp_path, model):
    path = tmp_path / "module.pt"
    torch.save(model, path)
    with pytest.raises(LandscapeError, match="pass --trust"):
        load_checkpoint(path)
    trusted = load_checkpoint(path, trust=True)
    assert trusted.meta["format"] == "pickled module"
    assert_same_weights(model, trusted.model)
    torch.save({"model": model, "epoch": 1}, tmp_path / "wrapped.pt")
    assert_same_weights(model, load_checkpoint(tmp_path / "wrapped.pt", trust=True, arch="cnn",
                                               arch_kwargs={"width": 4}).model)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pickle_never_runs_without_trust(tmp_path, capsys):
    torch.save({"state_dict": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(LandscapeError, match="pass --trust"):
        load_checkpoint(tmp_path / "evil.pt", arch="cnn")
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_needs_trust(tmp_path, model):
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    with pytest.raises(LandscapeError, match="TorchScript.*pass --trust"):
        load_checkpoint(path)
    scripted = load_checkpoint(path, trust=True)
    assert isinstance(scripted.model, torch.jit.ScriptModule) and scripted.meta["format"] == "torchscript"
    assert_same_weights(model, scripted.model)
    eager = load_checkpoint(path, trust=True, arch="cnn", arch_kwargs={"width": 4})
    assert not isinstance(eager.model, torch.jit.ScriptModule)
    assert_same_weights(model, eager.model)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", "truncated"])
def test_corrupt_files_are_input_errors(tmp_path, model, content):
    path = tmp_path / "broken.pt"
    if content == "truncated":
        save_own(path, model)
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    with pytest.raises(LandscapeError, match="corrupt, truncated or not a PyTorch"):
        load_checkpoint(path)


def test_missing_file_and_non_weights(tmp_path):
    with pytest.raises(LandscapeError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(LandscapeError, match="holds a list, not model weights"):
        load_checkpoint(tmp_path / "list.pt", arch="cnn")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pt")
    with pytest.raises(LandscapeError, match="no state_dict found.*epoch, optimizer"):
        load_checkpoint(tmp_path / "no_weights.pt", arch="cnn")


def own_payload(path, model):
    save_own(path, model)
    return torch.load(path, weights_only=True)


def test_missing_arch_is_refused_unless_named(tmp_path, model):
    path = tmp_path / "no_arch.pt"
    torch.save({key: value for key, value in own_payload(path, model).items() if key != "arch"}, path)
    with pytest.raises(LandscapeError, match=r"records no 'arch' field; pass --arch NAME"):
        load_checkpoint(path)
    assert_same_weights(model, load_checkpoint(path, arch="cnn").model)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("arch", 5, "ill-typed 'arch' field (int, expected str)"),
    ("arch_kwargs", [1, 2], "ill-typed 'arch_kwargs' field (list, expected dict)"),
    ("arch_kwargs", {1: 2}, "non-string option names in its 'arch_kwargs' field"),
    ("dataset", ["digits"], "ill-typed 'dataset' field (list, expected str)"),
    ("metrics", 0.5, "ill-typed 'metrics' field (float, expected dict)"),
    ("seed", "3", "ill-typed 'seed' field (str, expected int or None)"),
    ("seed", True, "ill-typed 'seed' field (bool, expected int or None)"),
    ("state_dict", [1], "no valid 'state_dict' field"),
    ("state_dict", None, "no valid 'state_dict' field"),
])
def test_ill_typed_metadata_is_refused_in_one_line(tmp_path, model, field, value, message):
    path = tmp_path / "bad.pt"
    torch.save({**own_payload(path, model), field: value}, path)
    with pytest.raises(LandscapeError, match="re-save it with landscape.save_checkpoint") as error:
        load_checkpoint(path, arch="cnn")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("arch_kwargs", [[1], "width=4", 3, {1: 4}])
def test_arch_kwargs_must_be_a_mapping_of_names(tmp_path, model, arch_kwargs):
    from landscape.objective import load_objective

    path = tmp_path / "own.pt"
    save_own(path, model)
    for load in (load_checkpoint, load_objective):
        with pytest.raises(LandscapeError, match=r"arch_kwargs \(--arch-kwargs\) must be an object of option names"):
            load(str(path), arch_kwargs=arch_kwargs)


def flip_byte(path, entry_suffix, offset, out):
    """Copy ``path`` to ``out`` with one bit flipped ``offset`` bytes into the data of the zip entry
    whose name ends with ``entry_suffix`` (the local header is parsed here, independently of the code)."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = next(info for info in archive.infolist() if info.filename.endswith(entry_suffix))
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + offset] ^= 0x01
    out.write_bytes(bytes(data))
    return entry.filename


def test_a_tampered_archive_is_refused(tmp_path, model):
    import zipfile

    path = tmp_path / "own.pt"
    save_own(path, model)
    tampered = tmp_path / "tampered.pt"
    entry = flip_byte(path, "/data/0", 5, tampered)  # a weight, not the pickle: it loads without complaint
    assert zipfile.ZipFile(tampered).testzip() == entry  # the ground truth: its CRC no longer matches
    with pytest.raises(LandscapeError, match=rf"checkpoint '.*tampered.pt' is damaged \(entry '{entry}' fails its "
                                             r"CRC check\); re-save or re-download it"):
        load_checkpoint(tampered)


def test_crc_check_spans_read_chunks(tmp_path):
    """Entries larger than the 1 MiB read chunk, checked in the single hashing pass."""
    import zipfile

    torch.manual_seed(0)
    path = tmp_path / "big.pt"
    torch.save({"a": torch.randn(300_000), "b": torch.randn(5), "c": torch.randn(700_000)}, path)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    for suffix, offset in (("/data/0", 1_100_000), ("/data/2", 2_700_000)):
        tampered = tmp_path / f"tampered{suffix[-1]}.pt"
        entry = flip_byte(path, suffix, offset, tampered)
        assert zipfile.ZipFile(tampered).testzip() == entry
        with pytest.raises(LandscapeError, match=f"entry '{entry}' fails its CRC check"):
            file_sha256(tampered)


def test_compressed_archives_are_checked_too(tmp_path, model):
    import zipfile

    path = tmp_path / "own.pt"
    save_own(path, model)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    assert_same_weights(model, load_checkpoint(deflated).model)  # torch.load reads deflated entries
    entry = flip_byte(deflated, "/data/0", 20, tmp_path / "tampered.pt")
    with pytest.raises(LandscapeError, match=f"is damaged .*{entry}"):
        load_checkpoint(tmp_path / "tampered.pt")
