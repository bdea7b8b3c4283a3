"""Tensors out of a TorchScript archive (e.g. OpenAI's CLIP ``RN50.pt``) without running any of its code.

``torch.jit.load`` executes the archive's TorchScript and ``torch.load(weights_only=True)`` refuses TorchScript
archives, so neither is acceptable for an untrusted file. The archive is a zip: ``<name>/data.pkl`` pickles the
module tree as objects of ``__torch__.*`` classes whose state is a dict of attributes (parameters, buffers,
submodules, plain values), and tensors reference raw storages in ``<name>/data/<key>``. This reader unpickles
``data.pkl`` with an unpickler that resolves four kinds of globals and nothing else: any ``__torch__.*`` class (to
one attribute-holding placeholder), ``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage`` types and
``collections.OrderedDict`` (any other global, e.g. ``os.system``, raises ``pickle.UnpicklingError``). It rebuilds
tensors from the raw little-endian storages and flattens the tree into a state dict keyed by attribute path
(``visual.layer1.0.conv1.weight``).

Tensor attributes that are not parameters or buffers in eager PyTorch (e.g. OpenAI CLIP's per-block ``attn_mask``)
come out too; callers drop what their model does not have.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Union

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for every ``__torch__.*`` class: keeps the attribute dict it is built with."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = dict(state) if isinstance(state, dict) else {"__state__": state}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None,
                    metadata=None) -> torch.Tensor:
    if not size:
        return storage[offset].clone() if storage.numel() else storage.new_empty(())
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"TorchScript archive: refusing to load global {module}.{name} (only tensors, "
                                     "storages and module attributes are read; no code runs)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"TorchScript archive: unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        t = t.view(stype.dtype) if stype.dtype != torch.uint8 else t
        if t.numel() < numel:
            raise pickle.UnpicklingError(f"TorchScript archive: storage {key} holds {t.numel()} elements, "
                                         f"{numel} expected")
        return t


def is_torchscript(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it has ``*/data.pkl`` and ``*/code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def _flatten(obj, prefix: str, out: dict) -> None:
    state = obj.state if isinstance(obj, _ScriptObject) else obj
    for name, value in state.items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, key + ".", out)


def read_torchscript_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archived module tree, by attribute path, on the CPU (dtypes as stored)."""
    with zipfile.ZipFile(path) as z:
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"{os.fspath(path)!r} is not a TorchScript archive (no unique <name>/data.pkl)")
        prefix = pkls[0].split("/")[0]
        byteorder = z.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in z.namelist() \
            else "little"
        if byteorder != "little":
            raise ValueError(f"{os.fspath(path)!r}: big-endian TorchScript archives are not supported")
        root = _Unpickler(z.read(pkls[0]), z, prefix).load()
    out: dict[str, torch.Tensor] = {}
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{os.fspath(path)!r}: the archive's root is not a module")
    _flatten(root, "", out)
    return out
