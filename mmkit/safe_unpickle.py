"""Reading the pickles inside checkpoints without running code they may carry.

A pickle names importable callables and calls them while it loads, so ``pickle.load`` or
``torch.load(weights_only=False)`` of a checkpoint someone else could write runs whatever they put
in it. Every checkpoint pickle mmkit reads, or lets a library read, goes through a loader that
admits only what checkpoints are made of:

- ``torch.save`` files (Lightning's ``.ckpt`` and ``meta.pt``, DeepSpeed's ``*.pt``, the non-tensor
  items inside ``torch.distributed.checkpoint`` shards): torch's ``weights_only`` unpickler
  (tensors, numbers, strings, containers), plus ``DEEPSPEED_GLOBALS`` for DeepSpeed's files only;
- ``torch.distributed.checkpoint``'s ``.metadata`` index, which torch itself reads with plain
  ``pickle.load``: ``load_dcp_metadata``, admitting only ``DCP_METADATA_GLOBALS``.

The allow-lists are what real checkpoints reference (listed from the pickles of FSDP2 runs and of
DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3-offload runs, torch 2.14 / DeepSpeed 0.19.8), nothing more.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


# ``.metadata`` of a torch.distributed.checkpoint folder: the index classes, the path it was saved
# to, and the tensor properties (size, layout; every ``torch.<dtype>`` is admitted as well).
DCP_METADATA_GLOBALS = (
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.Size",
    "torch.serialization._get_layout",
    "pathlib.PosixPath",  # StorageMeta.checkpoint_id: the folder it was saved to
    "pathlib.WindowsPath",
)
_PATH_CLASSES = {"pathlib._local.PosixPath": "pathlib.PosixPath",  # how Python >= 3.13 pickles them
                 "pathlib._local.WindowsPath": "pathlib.WindowsPath"}

# DeepSpeed's ``*_optim_states.pt`` hold three of its objects besides tensors and containers: the
# optimizer's loss scaler (DynamicLossScaler under fp16 dynamic loss scaling, read from DeepSpeed's
# ZeRO state_dict code: not written by CPU runs), the ZeRO stage as an enum and ZeRO-1/2's map of
# each parameter's slice of the flat fp32 partition. Its ``*_model_states.pt`` need none.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def deepspeed_globals() -> list[Any]:
    """The classes of ``DEEPSPEED_GLOBALS``, for ``torch.serialization.safe_globals`` (imports DeepSpeed)."""
    return [_resolve(name) for name in DEEPSPEED_GLOBALS]


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referenced a global that its allow-list does not hold."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _MetadataUnpickler(pickle.Unpickler):
    # Every global a pickle uses (to call, construct, or as a value) is looked up through
    # find_class; refusing there refuses it for every opcode.
    def find_class(self, module: str, name: str) -> Any:
        full = _PATH_CLASSES.get(f"{module}.{name}", f"{module}.{name}")
        if full in DCP_METADATA_GLOBALS:
            return _resolve(full)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise RefusedGlobal(f"{module}.{name}")


def load_dcp_metadata(path: str | os.PathLike) -> Any:
    """The ``Metadata`` of a torch.distributed.checkpoint ``.metadata`` file, unpickled with only
    ``DCP_METADATA_GLOBALS`` (and dtypes) admitted. ``CheckpointLoadError`` names the file and the
    global it refused."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except RefusedGlobal as e:
        raise refused(path, e.name) from None
    except Exception as e:  # truncated, or allowed classes put together wrongly
        raise CheckpointLoadError(f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointLoadError(f"checkpoint file {path} is not a torch.distributed.checkpoint index "
                                  f"(a {type(metadata).__name__})")
    return metadata


def refused(path: str | os.PathLike, name: str | None) -> CheckpointLoadError:
    """The error for a checkpoint pickle that references ``name`` (a global no allow-list holds)."""
    what = f"references {name}, which a checkpoint never needs" if name else "holds an object a checkpoint never needs"
    return CheckpointLoadError(
        f"checkpoint file {path} {what}: refused, not loaded (it carries code or objects, and unpickling "
        "them could run code; a checkpoint holds only tensors, numbers, strings and containers of them, "
        "what weights_only loading admits)"
    )


def refused_global(error: BaseException) -> str | None:
    """The global a ``torch.load(weights_only=True)`` refused, from its error (torch 2.14 says
    "Unsupported global: GLOBAL exec was not an allowed global" or "Trying to load unsupported
    GLOBAL posix.system whose module posix is blocked"); "" for a refused object it does not
    name; None when the error is not such a refusal (a damaged file)."""
    if isinstance(error, RefusedGlobal):
        return error.name
    message = str(error)
    match = re.search(r"\bGLOBAL (\S+)", message, re.IGNORECASE)
    if match:
        name = match.group(1)
        return name if "." in name else f"builtins.{name}"  # torch drops the "builtins." prefix
    if re.search(r"unrecognized function|Can only (create|build)", message, re.IGNORECASE):
        return ""
    return None


def error_reason(message: str) -> str:
    """What went wrong, from a ``torch.load`` error, without torch's advice to retry with
    ``weights_only=False`` (wrong for a damaged file, dangerous for a crafted one)."""
    import torch.serialization

    unsafe_advice = getattr(torch.serialization, "UNSAFE_MESSAGE", "")  # a module constant in newer torch only
    message = message.split("WeightsUnpickler error:", 1)[-1]
    if unsafe_advice:
        message = message.replace(unsafe_advice, "")
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue", "Please use")
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(skip)]
    return lines[0] if lines else "no message"


def torch_load(source: str | os.PathLike | io.BytesIO, *, allow: Iterable[Any] = (), mmap: bool = False,
               map_location: Any = "cpu", name: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` admitting ``allow`` besides torch's own safe types;
    a refusal or a damaged file is a ``CheckpointLoadError`` naming ``name`` (default: the path)."""
    allow = list(allow)
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise load_error(name or str(source), e, source, allow) from e


def load_error(name: str | os.PathLike, error: BaseException, source: Any = None,
               allow: Iterable[Any] = ()) -> CheckpointLoadError:
    """The ``CheckpointLoadError`` for a failed ``torch.load`` of ``source``: refused (naming the
    global) or damaged."""
    refusal = refused_global(error)
    if refusal is None and isinstance(error, pickle.UnpicklingError) and source is not None:
        # torch's weights_only loader stops at pickle opcodes it does not read (protocol 4 and up,
        # which torch.save never writes) before it reaches a global: find what the file references.
        refusal = _first_refused_global(source, allow)
    if refusal is not None:
        return refused(name, refusal)
    size = f" ({os.stat(name).st_size} bytes)" if isinstance(name, (str, Path)) and os.path.isfile(name) else ""
    return CheckpointLoadError(f"checkpoint {name}{size} is truncated or corrupt and cannot be loaded "
                               f"({type(error).__name__}: {error_reason(str(error))})")


class _Stub:
    """What every global becomes in ``_GlobalsRecorder``: callable with anything, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _GlobalsRecorder(pickle.Unpickler):
    # Unpickles without importing or calling anything real: find_class is the only way a pickle
    # gets a callable, and here it hands out _Stub and records the name.
    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.names: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        self.names.append(f"{module}.{name}")
        return _Stub

    def persistent_load(self, pid: Any) -> None:
        return None


def _first_refused_global(source: Any, allow: Iterable[Any]) -> str | None:
    """The first global in a torch zip file's pickle that torch's ``weights_only`` loader does not
    admit by default and ``allow`` does not add; None if none is found or the file is unreadable."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # torch's own list, by name

        if isinstance(source, io.BytesIO):
            source.seek(0)
        with zipfile.ZipFile(source) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"))
        recorder = _GlobalsRecorder(io.BytesIO(data))
        with contextlib.suppress(Exception):  # a stub in the wrong place ends the scan; the names so far count
            recorder.load()
        admitted = set(_get_allowed_globals()) | {f"{a.__module__}.{a.__qualname__}" for a in allow}
    except Exception:
        return None
    return next((n for n in recorder.names if n not in admitted), None)


def can_mmap(path: str | os.PathLike) -> bool:
    """torch memory-maps only its zip format (the default since torch 1.6)."""
    return zipfile.is_zipfile(path)


@contextlib.contextmanager
def weights_only_everywhere(allow: Iterable[Any] = ()) -> Iterator[None]:
    """Every ``torch.load`` inside, library code that asks for ``weights_only=False`` included,
    loads with ``weights_only=True`` and admits ``allow`` besides torch's own safe types: torch
    reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at each call. For code mmkit calls but does not own
    (DeepSpeed's zero_to_fp32 and engine, torch.distributed.checkpoint's non-tensor items).
    Process-wide while it lasts: not for use around other threads' loading."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allow)):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
