"""Self-describing checkpoints, and safe loading of foreign ones.

Own format: a plain dict readable by ``torch.load(weights_only=True)`` with a format tag,
the architecture name and kwargs (including ``num_classes`` and ``input_shape``), the dataset
spec, the optimizer name and hyper-parameters, the state_dict, metrics, seed and versions.
It is written atomically (temporary file, then ``os.replace``).

Foreign files: a bare state_dict, a dict holding one under ``state_dict``, ``model_state_dict``,
``model`` or ``state_dict_ema`` (tried in that order), or a ``.safetensors`` file. ``module.``
(DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped; the architecture comes
from ``arch``/``arch_kwargs``. Files are always read with ``weights_only=True`` first; a pickled
``nn.Module`` or a TorchScript archive loads only with ``trust=True``, since unpickling can run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from landscape.errors import LandscapeError
from landscape.models import build_model

FORMAT = "landscape-checkpoint/1"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN_OFFENDERS = 5
TRUST_HINT = "pass --trust (trust=True) only if you trust the file, since loading it can run arbitrary code"


@dataclass
class Checkpoint:
    """A loaded model (in eval mode) with its metadata and the file's SHA-256."""

    model: nn.Module
    meta: dict
    path: str
    sha256: str


def landscape_version() -> str:
    """The installed ``landscape`` version."""
    try:
        from landscape import __version__
    except ImportError:
        return "0.1.0"
    return __version__


def versions() -> dict[str, str]:
    """Versions recorded in checkpoints: landscape, torch, python."""
    return {"landscape": landscape_version(), "torch": torch.__version__, "python": platform.python_version()}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str, arch_kwargs: dict, dataset: str,
                    optimizer: str, optimizer_hparams: dict, metrics: dict, seed: int | None,
                    extra: dict | None = None) -> None:
    """Write ``model`` in the own format, atomically.

    ``arch_kwargs`` should include ``num_classes`` and ``input_shape`` so that
    ``load_checkpoint(path)`` rebuilds the model alone. Metadata values must be plain Python
    data (numbers, strings, lists, tuples, dicts, tensors); numpy scalars and arrays are converted.
    """
    payload = {
        "format": FORMAT,
        "arch": str(arch),
        "arch_kwargs": _plain(arch_kwargs, "arch_kwargs"),
        "dataset": str(dataset),
        "optimizer": str(optimizer),
        "optimizer_hparams": _plain(optimizer_hparams, "optimizer_hparams"),
        "metrics": _plain(metrics, "metrics"),
        "seed": _plain(seed, "seed"),
        "versions": _plain(versions(), "versions"),
        "extra": _plain(extra or {}, "extra"),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)  # temporary files are private; the checkpoint is not
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    num_classes: int | None = None, input_shape: tuple | None = None, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load an own or foreign checkpoint into a model in eval mode.

    ``arch``/``arch_kwargs``/``num_classes``/``input_shape`` override what an own checkpoint
    records and are required (``arch`` at least) for foreign weights. ``trust=True`` allows
    pickled modules and TorchScript archives. A TorchScript archive loaded without ``arch``
    stays a ``ScriptModule``, which ``torch.func`` cannot differentiate; pass ``arch`` to load its
    weights into an eager model. Every user-facing failure raises :class:`LandscapeError`.
    """
    path = Path(path)
    if not path.is_file():
        raise LandscapeError(f"checkpoint '{path}' not found; check the path")
    loaded = _read(path, trust, map_location)
    overrides = {key: value for key, value in (("num_classes", num_classes), ("input_shape", input_shape))
                 if value is not None}
    if isinstance(loaded, Mapping) and str(loaded.get("format", "")).startswith("landscape-checkpoint/"):
        if loaded["format"] != FORMAT:
            raise LandscapeError(f"'{path}' has format {loaded['format']}, newer than this version reads "
                                 f"({FORMAT}); upgrade landscape")
        meta = {key: value for key, value in loaded.items() if key != "state_dict"}
        arch = arch or meta["arch"]
        kwargs = {**meta["arch_kwargs"], **(arch_kwargs or {}), **overrides}
        state = loaded["state_dict"]
    else:
        module, state, source = _foreign_weights(loaded, path)
        meta = {"format": source, "arch": arch, "arch_kwargs": {**(arch_kwargs or {}), **overrides}}
        if module is not None and arch is None:
            return Checkpoint(module.eval(), meta, str(path), file_sha256(path))
        if arch is None:
            raise LandscapeError(f"'{path}' holds weights without an architecture; pass --arch NAME "
                                 "(see `landscape models`) or --arch module:function, and --arch-kwargs JSON "
                                 "(e.g. '{\"num_classes\": 10, \"input_shape\": [3, 32, 32]}') if needed")
        kwargs = meta["arch_kwargs"]
        meta["arch"] = arch
    model = build_model(arch, **kwargs)
    _load_state(model, _strip_prefixes(state), path, arch)
    return Checkpoint(model.to(map_location).eval(), meta, str(path), file_sha256(path))


def _read(path: Path, trust: bool, map_location) -> object:
    """The file's content: safetensors dict, weights-only unpickled object, or (trusted) module."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as error:  # any failure means the file is not readable safetensors
            raise _unreadable(path, error) from None
    if _is_torchscript(path):
        if not trust:
            raise LandscapeError(f"'{path}' is a TorchScript archive, which holds code; {TRUST_HINT}")
        try:
            return torch.jit.load(str(path), map_location=map_location)
        except Exception as error:  # any failure means the archive is damaged
            raise _unreadable(path, error) from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # only references to Python classes/functions need trust
            raise _unreadable(path, error) from None
    except Exception as error:  # any other failure means the file is corrupt or not a checkpoint
        raise _unreadable(path, error) from None
    if not trust:
        raise LandscapeError(f"'{path}' contains pickled Python objects (e.g. a whole nn.Module); {TRUST_HINT}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # e.g. the pickled class is not importable here
        raise LandscapeError(f"cannot unpickle '{path}' ({type(error).__name__}: {error}); make the classes "
                             "it was saved with importable, or save a state_dict instead") from None


def _unreadable(path: Path, error: Exception) -> LandscapeError:
    """Error for a corrupt, truncated or unrelated file."""
    # torch's own messages run to paragraphs of advice about weights_only; keep only the error type
    return LandscapeError(f"cannot read checkpoint '{path}' ({type(error).__name__}); the file is corrupt, "
                          "truncated or not a PyTorch/safetensors checkpoint: re-save or re-download it")


def _is_torchscript(path: Path) -> bool:
    """True for a zip archive with TorchScript code (``constants.pkl`` and ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") for name in names)


def _foreign_weights(loaded: object, path: Path) -> tuple[nn.Module | None, dict[str, Tensor], str]:
    """``(module or None, state_dict, source description)`` from a foreign file's content."""
    if isinstance(loaded, torch.jit.ScriptModule):
        return loaded, loaded.state_dict(), "torchscript"
    if isinstance(loaded, nn.Module):
        return loaded, loaded.state_dict(), "pickled module"
    if isinstance(loaded, Mapping) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        return None, dict(loaded), "state_dict" if path.suffix != ".safetensors" else "safetensors"
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            value = loaded.get(key)
            if isinstance(value, nn.Module):
                return value, value.state_dict(), f"pickled module under '{key}'"
            if isinstance(value, Mapping) and value and all(isinstance(v, Tensor) for v in value.values()):
                return None, dict(value), f"state_dict under '{key}'"
        keys = ", ".join(map(str, list(loaded)[:8]))
        raise LandscapeError(f"no state_dict found in '{path}' (top-level keys: {keys}); save the "
                             f"model's state_dict, bare or under one of: {', '.join(STATE_DICT_KEYS)}")
    raise LandscapeError(f"'{path}' holds a {type(loaded).__name__}, not model weights; save the model's "
                         "state_dict (torch.save(model.state_dict(), path))")


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``) that every key carries."""
    state = dict(state)
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None)
        if prefix is None:
            break
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _load_state(model: nn.Module, state: Mapping[str, Tensor], path: Path, arch: str) -> None:
    """Copy ``state`` into ``model``, or raise one error listing missing/unexpected/misshaped keys.

    A missing BatchNorm ``num_batches_tracked`` counter (old checkpoints) is not an error.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    misshaped = [f"{key} (file {list(state[key].shape)} vs model {list(expected[key].shape)})"
                 for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = [f"{len(keys)} {kind} key(s): {', '.join(keys[:SHOWN_OFFENDERS])}"
                + (", ..." if len(keys) > SHOWN_OFFENDERS else "")
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", misshaped))
                if keys]
    if problems:
        raise LandscapeError(f"weights in '{path}' do not fit arch '{arch}': {'; '.join(problems)}; check --arch "
                             "and --arch-kwargs (num_classes, input_shape, width, ...)")
    model.load_state_dict(state, strict=False)


def _plain(value: object, name: str) -> object:
    """``value`` as data ``torch.load(weights_only=True)`` accepts; numpy values become Python values."""
    if isinstance(value, np.generic):  # before float: np.float64 subclasses float
        return value.item()
    if value is None or isinstance(value, Tensor):
        return value
    for kind in (bool, int, float, str):  # exact types: subclasses (e.g. TorchVersion) are not allowed
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, name) for item in value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item, name) for key, item in value.items()}
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    raise ValueError(f"{name} holds a {type(value).__name__}, which a weights-only checkpoint cannot store; "
                     "convert it to numbers, strings, lists or dicts")
