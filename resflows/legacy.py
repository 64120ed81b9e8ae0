"""A guarded reader for checkpoints written by the paper's code (format: docs/paper-differences.md).

Those files are pickles that name the paper's classes (``resflows.*`` or, for the released 2019
checkpoints, ``lib.*``), an ``argparse.Namespace`` and an EMA object holding a whole pickled model.
Loading them with plain ``pickle`` (or ``torch.load(weights_only=False)``) would import and run whatever
the file names. This reader never does: it parses torch's zip and legacy (pre-1.6) containers itself
and unpickles with a whitelist:

* plain containers (``OrderedDict``, ``set``, ``frozenset``), ``torch.Size``, dtypes and devices;
* torch's tensor/parameter rebuild functions and storage types, replaced by our own equivalents that
  only build tensors from the archive's bytes;
* classes under ``resflows.*``, ``lib.*``, ``torch.nn.*`` and ``argparse.Namespace`` become inert
  stand-ins that only record their pickled state;

and refuses everything else with :class:`NotACheckpointError`. Before anything is unpacked, a zip archive's
directory is checked (:func:`check_zip_archive`: the sizes it declares, then every entry's CRC-32, which
``torch.load`` does not verify), and what the pickle held is checked for its structure (nesting depth, key
types, integer sizes) and types before any of it is used.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Dict, Optional

import torch

__all__ = ["NotACheckpointError", "StandIn", "load_paper_checkpoint", "read_paper_pickle", "check_zip_archive",
           "check_structure"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Looked up by name in a fixed table: getattr(torch, name) would let a file trigger torch's lazy imports.
_DTYPES = {n: getattr(torch, n) for n in (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
    "int16", "short", "int8", "uint8", "bool", "complex64", "complex128")}

_STAND_IN_PREFIXES = ("resflows.", "lib.", "torch.nn.modules.", "torch.nn.parameter")


class NotACheckpointError(ValueError):
    """The file is not a Residual Flows checkpoint (or it is damaged)."""


# torch.save stores its entries uncompressed, so their declared sizes add up to about the file's size; an
# archive whose entries claim much more would be inflated in memory (a zip bomb) and is refused unread.
MAX_INFLATION = 4
_INFLATION_SLACK = 1 << 20  # bytes: headers and a small compressed record are always allowed


def check_zip_archive(path: str) -> None:
    """Refuse (:class:`NotACheckpointError`) a zip archive whose entries declare more bytes than
    ``MAX_INFLATION`` times the file's size, or any entry whose CRC-32 does not match its bytes (a flipped
    byte on disk or in transfer: ``torch.load`` does not check). Entries are read in 1 MiB pieces, bounded by
    the sizes already checked, so nothing is inflated in memory."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            declared = sum(i.file_size for i in infos)
            if declared > MAX_INFLATION * size + _INFLATION_SLACK:
                raise NotACheckpointError(
                    f"its zip entries declare {declared / 2**20:.0f} MiB in a {size / 2**20:.2f} MiB file (a zip bomb?); "
                    f"refusing to unpack it")
            for info in infos:
                with zf.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except NotACheckpointError:
        raise
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            raise NotACheckpointError(f"the file is damaged: {e} (a changed byte on disk or in transfer); "
                                      f"use another copy") from None
        raise NotACheckpointError(f"the file is damaged: its zip archive cannot be read ({e})") from None
    except (RuntimeError, NotImplementedError, ValueError, OSError, EOFError) as e:  # encrypted, unknown method...
        raise NotACheckpointError(f"its zip archive cannot be read ({type(e).__name__}: {e})") from None


# What a checkpoint may hold, checked before anything is used: nesting (a legitimate checkpoint is a few
# levels deep; a paper checkpoint's pickled modules some more), key types, and integers that fit 64 bits.
MAX_DEPTH = 64
_LEAVES = (str, bytes, float, bool, type(None), torch.dtype, torch.device)


def check_structure(obj: Any, what: str = "", max_depth: int = MAX_DEPTH, stand_ins: bool = False) -> None:
    """Walk ``obj`` (iteratively: any depth is safe) and raise :class:`NotACheckpointError` at the first
    container nested deeper than ``max_depth``, dict key that is not a string or an integer, integer beyond
    64 bits, or object that is not a tensor, a plain container or a primitive (``stand_ins``: also the
    stand-ins of the paper's classes, whose recorded state is walked)."""
    stack = [(obj, what, 0)]
    while stack:
        o, name, depth = stack.pop()
        where = name or "the top level"
        if isinstance(o, torch.Tensor) or isinstance(o, _LEAVES):
            continue
        if isinstance(o, int):
            if o.bit_length() > 64:
                raise NotACheckpointError(f"it holds an integer of {o.bit_length()} bits at {where} (at most 64 fit)")
            continue
        if depth >= max_depth:
            raise NotACheckpointError(f"it is nested more than {max_depth} levels deep (at {where})")
        if stand_ins and isinstance(o, StandIn):
            o = o.__dict__
        if isinstance(o, dict):
            for k, v in o.items():
                if not isinstance(k, (str, int)) or (isinstance(k, int) and k.bit_length() > 64):
                    raise NotACheckpointError(f"it holds a dict key of type {type(k).__name__} at {where}")
                stack.append((v, f"{name}.{k}" if name else str(k), depth + 1))
        elif isinstance(o, (list, tuple, set, frozenset)):
            for i, v in enumerate(o):
                stack.append((v, f"{name}.{i}" if name else str(i), depth + 1))
        elif not (stand_ins and isinstance(o, _StorageType)):
            raise NotACheckpointError(f"it holds a {type(o).__name__} at {where}, which a checkpoint does not contain")


class StandIn:
    """Inert replacement for a class named by a paper checkpoint: keeps the pickled state only."""

    _module = "?"
    _name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._module}.{self._name}>"


_stand_in_classes: Dict[tuple, type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(name, (StandIn,), {"_module": module, "_name": name, "__module__": __name__})
    return _stand_in_classes[key]


class _StorageType:
    """Stands for ``torch.FloatStorage`` etc.: only carries the dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, storage_offset: int, size, stride, *unused) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise NotACheckpointError("malformed tensor record")
    # A view, not a copy: legacy files fill the storage bytes after the pickle is read. The offset is relative
    # to the storage record, which may itself be a view (legacy storage views).
    return storage.as_strided(tuple(size), tuple(stride), storage.storage_offset() + storage_offset)


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, backward_hooks=None, *unused) -> torch.Tensor:
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state=None) -> torch.Tensor:
    return data


def _reconstructor(cls, base, state):
    # copyreg._reconstructor, only for our stand-ins (protocol 0/1 object pickles).
    if isinstance(cls, type) and issubclass(cls, StandIn):
        obj = cls.__new__(cls)
        return obj
    raise NotACheckpointError("refusing to reconstruct a foreign object")


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: "_Storages"):
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "argparse" and name == "Namespace":
            return _stand_in(module, name)
        if module.startswith(_STAND_IN_PREFIXES) or module in ("resflows", "lib"):
            return _stand_in(module, name)
        raise NotACheckpointError(
            f"it names {module}.{name}, which a Residual Flows checkpoint does not contain; refusing to load it"
        )

    def persistent_load(self, pid):
        return self._storages.resolve(pid)


class _Storages:
    """Storage records of both container formats; tensors are views into these flat buffers."""

    def __init__(self, zip_reader: Optional["_ZipReader"] = None, max_bytes: Optional[int] = None):
        self.zip = zip_reader
        self.max_bytes = max_bytes  # legacy files: no storage can be larger than the file that holds it
        self.flat: Dict[str, torch.Tensor] = {}

    def resolve(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise NotACheckpointError("malformed storage record")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # legacy format: source of a pickled container class
            return pid[1]
        if kind != "storage":
            raise NotACheckpointError(f"unknown record type {kind!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise NotACheckpointError("malformed storage type")
        if key not in self.flat:
            if self.zip is not None:
                self.flat[key] = self.zip.storage(key, storage_type.dtype, numel)
            else:  # legacy: filled in after the pickle, from the bytes that follow it
                nbytes = numel * torch.empty((), dtype=storage_type.dtype).element_size()
                if numel < 0 or (self.max_bytes is not None and nbytes > self.max_bytes):
                    raise NotACheckpointError(f"storage {key} claims {nbytes} bytes, more than the whole file holds; "
                                              f"the file is damaged or crafted")
                self.flat[key] = torch.zeros(numel, dtype=storage_type.dtype)
        flat = self.flat[key]
        if view is not None:
            view_key, offset, view_size = view
            return flat[int(offset) : int(offset) + int(view_size)]
        return flat


class _ZipReader:
    def __init__(self, zf: zipfile.ZipFile):
        self.zf = zf
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise NotACheckpointError("it is a zip archive without a data.pkl record")
        self.prefix = pkl[0][: -len("data.pkl")]
        order = self.prefix + "byteorder"
        self.byteorder = zf.read(order).decode() if order in names else "little"

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        raw = bytearray(self.zf.read(f"{self.prefix}data/{key}"))
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) < numel * itemsize:
            raise NotACheckpointError(f"storage {key} is truncated")
        t = torch.frombuffer(raw, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)
        if self.byteorder != "little" and itemsize > 1:
            t = t.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
        return t.clone()


def _load_plain(f) -> Any:
    """Unpickle a record that may only contain plain data (legacy header / key lists)."""
    return _RestrictedUnpickler(f, _Storages()).load()


def read_paper_pickle(path: str, verify: bool = True) -> Any:
    """Read a torch-serialised pickle (zip or legacy format) with the restricted unpickler. ``verify=False``
    skips :func:`check_zip_archive` (for a caller that has run it)."""
    try:
        if zipfile.is_zipfile(path):
            if verify:
                check_zip_archive(path)
            with zipfile.ZipFile(path) as zf:
                reader = _ZipReader(zf)
                storages = _Storages(reader)
                data = zf.read(reader.prefix + "data.pkl")
                return _RestrictedUnpickler(io.BytesIO(data), storages).load()
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(0)
            if len(head) >= 262 and head[257:262] == b"ustar":
                raise NotACheckpointError("it is a tar archive from torch < 0.4, which is not supported")
            magic = _load_plain(f)
            if magic != _MAGIC_NUMBER:
                raise NotACheckpointError("it is not a torch checkpoint (bad magic number)")
            if _load_plain(f) != _PROTOCOL_VERSION:
                raise NotACheckpointError("unsupported torch serialisation protocol")
            _load_plain(f)  # sys info
            storages = _Storages(max_bytes=os.path.getsize(path))
            result = _RestrictedUnpickler(f, storages).load()
            keys = _load_plain(f)
            for key in keys:
                flat = storages.flat[str(key)]
                (numel,) = struct.unpack("<q", f.read(8))
                nbytes = numel * flat.element_size()
                raw = f.read(nbytes)
                if len(raw) != nbytes or numel != flat.numel():
                    raise NotACheckpointError("the file is truncated")
                flat.copy_(torch.frombuffer(bytearray(raw), dtype=flat.dtype, count=numel))
            return result
    except NotACheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, struct.error, ValueError, TypeError,
            AttributeError, IndexError, RuntimeError, UnicodeDecodeError, tarfile.TarError) as e:
        raise NotACheckpointError(f"it could not be read as a checkpoint ({type(e).__name__}: {e})") from None


def _strip_module_prefix(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def load_paper_checkpoint(path: str, verify: bool = True) -> Dict[str, Any]:
    """The paper checkpoint's contents as plain data:
    ``{'args': dict, 'state_dict': {...}, 'ema': {name: tensor} or None, 'optimizer_state_dict': dict or None,
    'test_bpd': float or None, 'begin_epoch': int or None, 'begin_iter': int or None}``. Its structure and types
    are checked before any of it is used."""
    obj = read_paper_pickle(path, verify)
    if not isinstance(obj, dict) or "state_dict" not in obj or "args" not in obj:
        raise NotACheckpointError("it is not a Residual Flows checkpoint (no 'state_dict' and 'args')")
    check_structure(obj, stand_ins=True)
    args = obj["args"]
    args = dict(args.__dict__) if isinstance(args, StandIn) else args
    if not isinstance(args, dict):
        raise NotACheckpointError("its 'args' record is not a flag namespace")
    bad_keys = [k for k in args if not isinstance(k, str)]
    if bad_keys:
        raise NotACheckpointError(f"its 'args' record has a key that is not a flag name ({bad_keys[0]!r})")
    args = {k: v for k, v in args.items() if not k.startswith("_")}
    check_structure(args, "args", max_depth=2)  # flag values: primitives, at most a list of them
    sd = obj["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise NotACheckpointError("its 'state_dict' is not a dict of tensors")
    ema = obj.get("ema")
    shadow = None
    if isinstance(ema, StandIn) and isinstance(getattr(ema, "shadow_params", None), dict):
        shadow = _strip_module_prefix(dict(ema.shadow_params))
    elif isinstance(ema, dict):
        shadow = _strip_module_prefix(ema)
    if shadow is not None and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in shadow.items()):
        raise NotACheckpointError("its EMA record does not hold tensors")
    test_bpd = obj.get("test_bpd")
    if isinstance(test_bpd, torch.Tensor) and test_bpd.numel() == 1 and test_bpd.is_floating_point():
        test_bpd = test_bpd.item()
    if isinstance(test_bpd, (int, float)) and not isinstance(test_bpd, bool):
        try:
            test_bpd = float(test_bpd)
        except OverflowError:
            test_bpd = math.inf
        if not math.isfinite(test_bpd):
            raise NotACheckpointError(f"its test_bpd is not a finite number ({test_bpd})")
    else:
        test_bpd = None  # absent or not a number: only informative
    opt = obj.get("optimizer_state_dict")
    # The Monotone Flows fork stores its counters in the checkpoint (it has no --begin-epoch flag).
    counters = {k: obj.get(k) if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool) else None
                for k in ("begin_epoch", "begin_iter")}
    return {
        **counters,
        "args": args,
        "state_dict": _strip_module_prefix(sd),
        "ema": shadow,
        "optimizer_state_dict": opt if isinstance(opt, dict) else None,
        "test_bpd": test_bpd,
    }
