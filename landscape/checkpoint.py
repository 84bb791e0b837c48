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

Metadata is data, never code: a ``module:function`` recorded in a file (``arch``, ``dataset``)
is imported only when the caller names it (``arch=``/``data=``) or passes ``trust=True``. Zip
archives (``torch.save``'s format) are checked entry by entry against their CRC-32 while the
file is hashed, so a damaged file is refused before it is unpickled.

:func:`target_state` reads the weights of another checkpoint (or module, or state dict) shaped like
a model's, for directions towards it (surfaces, interpolation).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import platform
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from landscape.data import DATASET_SCHEMES, names_code
from landscape.errors import LandscapeError
from landscape.models import build_model, model_options

FORMAT = "landscape-checkpoint/1"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN_OFFENDERS = 5
TRUST_HINT = "pass --trust (trust=True) only if you trust the file, since loading it can run arbitrary code"
CHUNK_BYTES = 1 << 20
LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature, ..., name and extra lengths
# Own-format metadata fields and the types they must have (the state_dict is checked separately).
META_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,), "arch_kwargs": (dict,), "dataset": (str,), "optimizer": (str,), "optimizer_hparams": (dict,),
    "metrics": (dict,), "seed": (int, type(None)), "versions": (dict,), "extra": (dict,)}
# Recorded fields that may name code, with the spec prefixes that do not and the option that names it instead.
CODE_FIELDS = {"arch": ((), "--arch"), "dataset": (DATASET_SCHEMES, "--data")}


@dataclass
class Checkpoint:
    """A loaded model (in eval mode) with its metadata and the file's SHA-256."""

    model: nn.Module
    meta: dict
    path: str
    sha256: str


@dataclass
class CheckpointFile:
    """What a checkpoint file holds, read without building a model or importing anything.

    ``meta`` is the own format's metadata (every field type-checked) or ``{"format": source}``
    for foreign weights; ``state`` the weights as saved (wrapper prefixes included); ``module``
    the whole model of a trusted pickled module or TorchScript archive, else ``None``.
    """

    meta: dict
    state: dict[str, Tensor]
    module: nn.Module | None
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
    """Hex SHA-256 of a file's bytes, checking a zip archive's entries against their CRC-32 on the way.

    The file is read once; a damaged entry raises :class:`LandscapeError`.
    """
    path = Path(path)
    spans = _stored_spans(path)
    digest = hashlib.sha256()
    crcs = [0] * len(spans)
    first = position = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
            end, view = position + len(chunk), memoryview(chunk)
            index = first
            while index < len(spans) and spans[index][1] < end:  # entries overlapping this chunk
                _, start, stop, _ = spans[index]
                low, high = max(start, position), min(stop, end)
                if low < high:
                    crcs[index] = zlib.crc32(view[low - position:high - position], crcs[index])
                index += 1
            position = end
            while first < len(spans) and spans[first][2] <= position:
                first += 1
    for (name, _, _, expected), crc in zip(spans, crcs):
        if crc != expected:
            raise _damaged(path, name)
    return digest.hexdigest()


def _stored_spans(path: Path) -> list[tuple[str, int, int, int]]:
    """``(name, start, stop, CRC-32)`` byte ranges of a zip archive's entries, sorted; ``[]`` if not a zip.

    ``torch.save`` stores entries uncompressed, so their CRC is that of their bytes in the file;
    a compressed entry (hand-made archives) is checked here by decompressing it.
    """
    if not zipfile.is_zipfile(path):
        return []
    spans = []
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            for entry in archive.infolist():
                if entry.compress_type != zipfile.ZIP_STORED:
                    with archive.open(entry) as stream:
                        while stream.read(CHUNK_BYTES):
                            pass
                    continue
                handle.seek(entry.header_offset)
                header = handle.read(LOCAL_HEADER.size)
                signature, name_length, extra_length = LOCAL_HEADER.unpack(header.ljust(LOCAL_HEADER.size, b"\0"))
                if signature != b"PK\x03\x04":
                    raise _damaged(path, entry.filename, "has no local header")
                start = entry.header_offset + LOCAL_HEADER.size + name_length + extra_length
                spans.append((entry.filename, start, start + entry.compress_size, entry.CRC))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        # bad directory, a compressed entry failing its CRC, or one zipfile cannot read (method, password)
        raise LandscapeError(f"checkpoint '{path}' is damaged ({error}); re-save or re-download it") from None
    return sorted(spans, key=lambda span: span[1])


def _damaged(path: Path, entry: str, problem: str = "fails its CRC check") -> LandscapeError:
    return LandscapeError(f"checkpoint '{path}' is damaged (entry '{entry}' {problem}); re-save or re-download it")


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
    save_atomically(payload, path)


def save_atomically(payload: object, path: str | os.PathLike) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file in its folder, fsync and ``os.replace``:
    a reader sees the old file or the new one, never a partial one."""
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


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> CheckpointFile:
    """Read a checkpoint's metadata and weights without building a model or importing anything.

    The file is hashed and its zip entries checked first; own-format metadata is type-checked.
    Only ``trust=True`` unpickles Python objects or loads TorchScript (which can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise LandscapeError(f"checkpoint '{path}' not found; check the path")
    sha256 = file_sha256(path)
    loaded = _read(path, trust, map_location)
    if isinstance(loaded, Mapping) and str(loaded.get("format", "")).startswith("landscape-checkpoint/"):
        if loaded["format"] != FORMAT:
            raise LandscapeError(f"'{path}' has format {loaded['format']}, newer than this version reads "
                                 f"({FORMAT}); upgrade landscape")
        meta = {key: value for key, value in loaded.items() if key != "state_dict"}
        _check_meta(meta, path)
        state = loaded.get("state_dict")
        if not _is_state_dict(state):
            raise LandscapeError(f"checkpoint '{path}' has no valid 'state_dict' field (a dict of tensors); "
                                 "the file is damaged: re-save it with landscape.save_checkpoint")
        return CheckpointFile(meta, dict(state), None, str(path), sha256)
    module, state, source = _foreign_weights(loaded, path)
    return CheckpointFile({"format": source}, state, module, str(path), sha256)


def load_checkpoint(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    num_classes: int | None = None, input_shape: tuple | None = None, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load an own or foreign checkpoint into a model in eval mode.

    ``arch``/``arch_kwargs``/``num_classes``/``input_shape`` override what an own checkpoint
    records and are required (``arch`` at least) for foreign weights. A ``module:function``
    architecture recorded in the file is refused unless ``trust=True`` (name it as ``arch``
    yourself instead). ``trust=True`` also allows pickled modules and TorchScript archives. A
    TorchScript archive loaded without ``arch`` stays a ``ScriptModule``, which ``torch.func``
    cannot differentiate; pass ``arch`` to load its weights into an eager model. Every
    user-facing failure raises :class:`LandscapeError`.
    """
    given = model_options(arch_kwargs, "arch_kwargs (--arch-kwargs)")
    file = read_checkpoint(path, trust=trust, map_location=map_location)
    path = Path(path)
    overrides = {key: value for key, value in (("num_classes", num_classes), ("input_shape", input_shape))
                 if value is not None}
    if file.meta["format"] == FORMAT:
        meta = file.meta
        if arch is None:
            arch = recorded_spec(meta, "arch", path, trust)
        if arch is None:
            raise LandscapeError(f"checkpoint '{path}' records no 'arch' field; pass --arch NAME (see "
                                 "`landscape models`) or re-save it with landscape.save_checkpoint")
        kwargs = {**meta.get("arch_kwargs", {}), **given, **overrides}
    else:
        meta = {"format": file.meta["format"], "arch": arch, "arch_kwargs": {**given, **overrides}}
        if file.module is not None and arch is None:
            return Checkpoint(file.module.eval(), meta, file.path, file.sha256)
        if arch is None:
            raise LandscapeError(f"'{path}' holds weights without an architecture; pass --arch NAME "
                                 "(see `landscape models`) or --arch module:function, and --arch-kwargs JSON "
                                 "(e.g. '{\"num_classes\": 10, \"input_shape\": [3, 32, 32]}') if needed")
        kwargs = meta["arch_kwargs"]
    model = build_model(arch, **kwargs)
    _load_state(model, strip_prefixes(file.state), path, arch)
    return Checkpoint(model.to(map_location).eval(), meta, file.path, file.sha256)


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the names and float64 values of ``tensors``, in order (a digest of weights not read from a file)."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def target_state(target: object, like: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The weights and buffers of another model shaped like ``like``, cast like them, and where they
    came from (``{"path", "sha256"}``).

    ``target`` is a checkpoint path, a :class:`Checkpoint`, an ``nn.Module`` or a state dict. Every
    name in ``like`` must exist there with the same shape.
    """
    if isinstance(target, (str, Path)):
        target = load_checkpoint(target)
    if isinstance(target, Checkpoint):
        info = {"path": str(target.path), "sha256": target.sha256}
        target = target.model
    else:
        info = {}
    if isinstance(target, nn.Module):
        state = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    elif isinstance(target, Mapping):
        state = dict(target)
    else:
        raise LandscapeError(f"cannot read weights from a {type(target).__name__}; "
                             "pass a checkpoint path, a Checkpoint, an nn.Module or a state dict")
    missing = [n for n in like if n not in state]
    if missing:
        raise LandscapeError(f"the other model lacks {missing[:3]}; both must share an architecture")
    wrong = [n for n, t in like.items() if tuple(state[n].shape) != tuple(t.shape)]
    if wrong:
        raise LandscapeError(f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} in the other model and "
                             f"{tuple(like[wrong[0]].shape)} here; both must share an architecture")
    cast = {n: state[n].detach().to(t.device, t.dtype) for n, t in like.items()}
    return cast, info or {"path": f"<{type(target).__name__}>", "sha256": tensors_sha256(cast)}


def recorded_spec(meta: Mapping, field: str, path: str | os.PathLike, trust: bool) -> str | None:
    """``meta[field]`` (``"arch"`` or ``"dataset"``) as recorded in the file ``path``, or ``None``.

    A recorded ``module:function`` is refused unless ``trust``: code runs only when the user
    names it (``--arch``/``--data``) or trusts the file.
    """
    spec = meta.get(field)
    schemes, option = CODE_FIELDS[field]
    if spec is not None and not trust and names_code(spec, schemes):
        raise LandscapeError(f"checkpoint '{path}' names code in its '{field}' field ({spec!r}); refusing to "
                             f"import it: pass {option} module:function yourself if you trust that code, or --trust")
    return spec


def _check_meta(meta: Mapping, path: Path) -> None:
    """Refuse own-format metadata whose fields have the wrong types (a damaged or hand-made file)."""
    for field, types in META_TYPES.items():
        value = meta.get(field)
        if field in meta and (not isinstance(value, types) or isinstance(value, bool)):
            wanted = " or ".join("None" if kind is type(None) else kind.__name__ for kind in types)
            raise LandscapeError(f"checkpoint '{path}' has an ill-typed '{field}' field ({type(value).__name__}, "
                                 f"expected {wanted}); the file is damaged: re-save it with landscape.save_checkpoint")
    if not all(isinstance(key, str) for key in meta.get("arch_kwargs", {})):
        raise LandscapeError(f"checkpoint '{path}' has non-string option names in its 'arch_kwargs' field; "
                             "the file is damaged: re-save it with landscape.save_checkpoint")


def _is_state_dict(value: object) -> bool:
    """True for a mapping of names to tensors."""
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())


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
    if _is_state_dict(loaded) and loaded:
        return None, dict(loaded), "state_dict" if path.suffix != ".safetensors" else "safetensors"
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            value = loaded.get(key)
            if isinstance(value, nn.Module):
                return value, value.state_dict(), f"pickled module under '{key}'"
            if _is_state_dict(value) and value:
                return None, dict(value), f"state_dict under '{key}'"
        keys = ", ".join(map(str, list(loaded)[:8]))
        raise LandscapeError(f"no state_dict found in '{path}' (top-level keys: {keys}); save the "
                             f"model's state_dict, bare or under one of: {', '.join(STATE_DICT_KEYS)}")
    raise LandscapeError(f"'{path}' holds a {type(loaded).__name__}, not model weights; save the model's "
                         "state_dict (torch.save(model.state_dict(), path))")


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
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
