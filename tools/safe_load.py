"""Read released checkpoints as their authors saved them, without running any code from the file.

Official training scripts save more than weights: VMamba's, MSVMamba's and HRVMamba's Swin-style trainers
store their yacs ``config`` (a ``yacs.config.CfgNode``) with the optimizer, scheduler and scaler state;
mmengine (mmseg/mmdet/mmpose) stores ``meta`` and a ``message_hub`` whose log buffers hold numpy arrays; Vim
stores its ``argparse.Namespace``. ``torch.load(weights_only=True)`` refuses all of these, and
``weights_only=False`` would import those packages and run whatever the file names.

``load_checkpoint`` unpickles with a restricted unpickler instead (Python's "restricting globals" recipe):

- tensors, plain containers and a short allowlist of harmless globals (torch's tensor rebuild functions,
  dtypes, ``torch.Size``, ``collections.OrderedDict``, ``argparse.Namespace``, bytes/sets) are rebuilt;
- every other class the file names becomes an ``Opaque`` placeholder that only records what the file says
  (the constructor arguments, the ``__setstate__`` state, dict and list items): the class is never imported and
  none of its code runs, so a ``CfgNode`` or mmengine ``HistoryBuffer`` loads with neither package installed;
- a file that names a global which runs code when called (``os.system``, ``builtins.eval``, ``subprocess``,
  ``importlib``, ``operator.methodcaller``, ...) is refused outright: such a file is an attack, not training
  state. Nothing from it is called in either case; refusing makes the attack visible.

TorchScript archives are refused too (``torch.load`` would hand them to ``torch.jit.load``).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import collections
import pickle
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Tuple

import torch

# Modules whose callables run code, open files or processes, import modules or reach arbitrary attributes.
_CODE_RUNNING_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "shutil", "socket",
    "pty", "code", "codeop", "ctypes", "multiprocessing", "pickle", "_pickle", "marshal", "webbrowser", "operator",
    "_operator", "types", "pdb", "bdb", "timeit", "trace", "inspect", "signal", "threading", "_thread", "asyncio",
    "tempfile", "io", "_io", "platform", "gc", "site", "pydoc", "commands", "popen2", "cProfile", "profile",
})


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> torch.Tensor:
    """torch's rebuild of a tensor with attributes, only for plain tensors / parameters and allowed rebuilds."""
    if func not in _TENSOR_REBUILDS.values() or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"tensor rebuild through {func!r} as {new_type!r} is not allowed")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


_TENSOR_REBUILDS = {f"torch._utils.{name}": getattr(torch._utils, name) for name in (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_cpu_tensor")
    if hasattr(torch._utils, name)}

_ALLOWED: Dict[str, Any] = {
    **_TENSOR_REBUILDS,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.serialization._get_layout": torch.serialization._get_layout,
    "torch.Size": torch.Size, "torch.device": torch.device, "torch.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
    "argparse.Namespace": argparse.Namespace,
    "_codecs.encode": codecs.encode,  # how protocol-2 pickles store bytes
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
    "builtins.complex": complex, "builtins.slice": slice, "builtins.range": range,
    # Plain types, referenced by protocol 0/1 pickles and as default factories (``defaultdict(list)``).
    **{f"builtins.{t.__name__}": t for t in (object, dict, list, tuple, int, float, str, bool, bytes)},
    **{str(dtype): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file names a global that would run code when unpickled."""


class Opaque:
    """An object of a class the checkpoint names but that is not rebuilt: it only records what the file holds.

    ``source`` is the class's "module.name"; ``args`` the constructor arguments, ``state`` what
    ``__setstate__`` would have received, ``dict_items`` / ``list_items`` the items of a dict or list subclass
    (a yacs ``CfgNode``'s keys and values are in ``dict_items``).
    """

    source = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.dict_items, obj.list_items = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<opaque {self.source}>"


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) for placeholder classes only."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        obj = cls.__new__(cls)
        obj.args = (state,) if state is not None else ()
        return obj
    raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")


def _attribute(obj: Any, name: str) -> type:
    """``builtins.getattr`` as protocol-2 pickles use it for methods and nested classes (``getattr(HistoryBuffer,
    'min')``), on placeholders only: the result is another placeholder, nothing is looked up."""
    if isinstance(obj, Opaque) or isinstance(obj, type) and issubclass(obj, Opaque):
        return RestrictedUnpickler.placeholder(obj.source, str(name))
    raise UnsafeCheckpointError(f"it calls builtins.getattr on a {type(obj).__name__}, which would run code "
                                f"when unpickled")


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__`` for placeholder classes and allowed containers only."""
    if isinstance(cls, type) and (issubclass(cls, Opaque) or cls in _ALLOWED.values()):
        return cls.__new__(cls, *args)
    raise pickle.UnpicklingError(f"copyreg.__newobj__ of {cls!r} is not allowed")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are the allowlist, ``Opaque`` placeholders, or a refusal."""

    placeholders: Dict[Tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2 modules (``__builtin__``, ``copy_reg``); map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if qualified == "copyreg._reconstructor":
            return _reconstructor
        if qualified in ("copyreg.__newobj__", "copyreg.__newobj_ex__"):
            return _newobj
        if qualified == "builtins.getattr":
            return _attribute
        if module.split(".")[0] in _CODE_RUNNING_MODULES:
            raise UnsafeCheckpointError(f"it names {qualified}, which would run code when unpickled")
        if module.split(".")[0] == "torch" and not name[:1].isupper():
            raise UnsafeCheckpointError(f"it names {qualified}, a torch function outside the allowlist (only "
                                        f"tensor rebuilds may be called)")
        return self.placeholder(module, name)

    @classmethod
    def placeholder(cls, module: str, name: str) -> type:
        """The (cached) ``Opaque`` subclass standing for ``module.name``."""
        if (module, name) not in cls.placeholders:
            cls.placeholders[(module, name)] = type(name, (Opaque,), {"source": f"{module}.{name}",
                                                                      "__module__": __name__})
        return cls.placeholders[(module, name)]


def _pickle_module() -> ModuleType:
    """A stand-in for the ``pickle`` module that ``torch.load`` uses for the data of a checkpoint."""
    module = ModuleType("mambalab_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    module.__name__ = "mambalab_restricted_pickle"
    return module


def load_checkpoint(path: Path) -> Any:
    """The unpickled content of a torch checkpoint file, read as this module's doc says (tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                raise ValueError(f"checkpoint {path} is a TorchScript archive (a program, not saved weights); "
                                 f"it is not loaded")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module())
    except UnsafeCheckpointError as err:
        raise ValueError(f"checkpoint {path} is refused: {err}; nothing from it was run") from err
    except Exception as err:  # not a torch file, truncated, or a refused reconstruction
        raise ValueError(f"checkpoint {path} cannot be read safely ({type(err).__name__}: {err})") from err


def describe(value: Any) -> str:
    """A short description of a checkpoint entry for messages: its type, or the class an Opaque stands for."""
    if isinstance(value, Opaque):
        return f"{value.source}, kept inert"
    if isinstance(value, dict):
        return f"dict of {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    return type(value).__name__
