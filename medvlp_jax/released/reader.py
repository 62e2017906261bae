"""Reading a released PyTorch / Lightning checkpoint into numpy without running code from the file.

A ``.ckpt`` / ``.pth`` is a pickle inside a zip. Unpickling an arbitrary pickle can run arbitrary code, so
it is only ever read through PyTorch's restricted unpickler (``torch.load(weights_only=True)``), which
rebuilds tensors and plain containers and refuses every other global. Without torch the file is refused
(one line); it is never handed to Python's own ``pickle``.

Two kinds of Lightning files (../shared/checkpoints/README.md):

  * MGCA (pytorch-lightning 1.5.10): callbacks keyed by strings, hyper-parameters a plain dict. The
    restricted unpickler reads it as is.
  * GLoRIA (pytorch-lightning 1.1.4): callbacks keyed by the callback *classes*, hyper-parameters an omegaconf
    ``DictConfig``. The restricted unpickler refuses those globals, and ``weights_only=False`` would import
    pytorch_lightning and omegaconf and execute whatever the pickle asks for.

For the second kind we stay inside the restricted unpickler: ``torch.serialization.
get_unsafe_globals_in_checkpoint`` lists the globals it would refuse (read from the pickle's opcodes, nothing
is executed), and each is allowed *under its name* but bound to an inert stand-in class of our own
(``torch.serialization.safe_globals([(StandIn, "omegaconf.dictconfig.DictConfig"), ...])``). A stand-in
accepts any constructor arguments and any ``__setstate__`` payload and discards them, so whatever a file
names -- a callback class, a config node, or ``os.system`` in a malicious file -- nothing of it runs; only the
tensors and plain containers are rebuilt. The stand-ins' names are reported. What is lost is the content of
those objects (callback states, the omegaconf experiment config), which an import never needs: sizes come
from the tensor shapes.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Any

import numpy as np

from medvlp_jax.released.namemap import CheckpointImportError, jsonable, optional_int


class TorchRequired(CheckpointImportError):
    """The checkpoint is a PyTorch pickle and torch is not installed."""


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint's tensors and metadata.

    Attributes:
      path: the file.
      state_dict: key -> numpy array (floating tensors as float32, integer buffers as int64).
      meta: JSON-safe metadata: epoch, global_step, pytorch_lightning_version, hparams_name, top_level_keys,
        hyper_parameters (a plain dict as saved, or the stand-in's repr).
      stand_ins: the globals that were bound to inert stand-ins while unpickling (empty for plain files).
    """
    path: str
    state_dict: dict[str, np.ndarray]
    meta: dict[str, Any]
    stand_ins: list[str]


def _import_torch(path: str):
    try:
        import torch
    except ImportError:
        raise TorchRequired(f"{path} is a PyTorch pickle and reading it needs torch, which is not installed "
                            f"(pip install torch; the CPU build is enough): it is only ever read through "
                            f"torch.load(weights_only=True), never unpickled without torch") from None
    return torch


def _stand_in(name: str) -> type:
    """An inert class that takes the place of the global ``name`` (module.qualname) while unpickling."""
    module, _, qualname = name.rpartition(".")

    def __new__(cls, *args, **kwargs):      # NEWOBJ: cls.__new__(cls, *args)
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):    # REDUCE: cls(*args); the arguments are discarded
        pass

    def __setstate__(self, state):          # BUILD: the pickled state is discarded
        pass

    def __repr__(self):
        return f"<stand-in for {name}>"

    return type(qualname.rsplit(".", 1)[-1] or "StandIn", (), dict(
        __new__=__new__, __init__=__init__, __setstate__=__setstate__, __repr__=__repr__,
        __module__=module, __qualname__=qualname, stand_in_for=name))


def _last_line(e: BaseException) -> str:
    """The informative line of an exception: torch's unpickler puts the refused global after a long preamble."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line.split(".")[0]]
    return f"{type(e).__name__}: {(named or lines or [''])[0]}"


def load_restricted(path: str) -> tuple[Any, list[str]]:
    """``torch.load(path, weights_only=True)``, with inert stand-ins for the globals it would refuse.

    Returns:
      (the unpickled object, names of the globals bound to stand-ins).

    Raises:
      TorchRequired: torch is not installed.
      CheckpointImportError: the file is not a readable torch checkpoint (one line).
    """
    torch = _import_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:
        pass                                 # refused globals: retried below with stand-ins
    except Exception as e:                   # not a zip, truncated, not a torch file
        raise CheckpointImportError(f"{path}: not a readable PyTorch checkpoint ({_last_line(e)})") from None
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as e:
        raise CheckpointImportError(f"{path}: the restricted unpickler refused it and its globals cannot be "
                                    f"listed ({_last_line(e)})") from None
    try:
        with torch.serialization.safe_globals([(_stand_in(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True), names
    except Exception as e:
        raise CheckpointImportError(f"{path}: the restricted unpickler refused it even with inert stand-ins for "
                                    f"{names} ({_last_line(e)})") from None


def _to_numpy(torch, key: str, value: Any, path: str) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise CheckpointImportError(f"{path}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point():
        return value.float().numpy()
    return value.numpy()


def read_checkpoint(path: str) -> LoadedCheckpoint:
    """Reads a Lightning ``.ckpt`` (its ``state_dict``), a ``{"model": state_dict}`` file or a bare state dict.

    Raises:
      TorchRequired: torch is not installed.
      CheckpointImportError: unreadable file or no state dict inside (one line naming the file).
    """
    if not os.path.isfile(path):
        raise CheckpointImportError(f"checkpoint file {path} does not exist")
    torch = _import_torch(path)
    raw, stand_ins = load_restricted(path)
    if not isinstance(raw, dict):
        raise CheckpointImportError(f"{path}: holds a {type(raw).__name__}, not a checkpoint dict")
    if isinstance(raw.get("state_dict"), dict):
        sd = raw["state_dict"]
    elif isinstance(raw.get("model"), dict):
        sd = raw["model"]
    elif raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        sd = raw
    else:
        raise CheckpointImportError(f"{path}: no 'state_dict' (Lightning) or 'model' entry and not a bare state "
                                    f"dict; top-level keys: {sorted(map(str, raw))[:10]}")
    arrays = {str(k): _to_numpy(torch, str(k), v, path) for k, v in sd.items()}
    meta = dict(epoch=optional_int(raw.get("epoch")), global_step=optional_int(raw.get("global_step")),
                pytorch_lightning_version=jsonable(raw.get("pytorch-lightning_version")),
                hparams_name=jsonable(raw.get("hparams_name")),
                hyper_parameters=jsonable(raw.get("hyper_parameters")),
                top_level_keys=sorted(map(str, raw)), stand_ins=stand_ins)
    return LoadedCheckpoint(path=path, state_dict=arrays, meta=meta, stand_ins=stand_ins)
