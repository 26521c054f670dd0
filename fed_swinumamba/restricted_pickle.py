"""Reading PyTorch files from the internet without running code from them.

Release checkpoints are often training checkpoints: next to the weights they pickle objects of the
training code (VMamba and Swin save their yacs ``CfgNode`` config), which ``torch.load(...,
weights_only=True)`` refuses, while a plain ``torch.load`` would import and run whatever the pickle
names. :func:`load_untrusted` keeps ``weights_only`` as the first try and otherwise unpickles with
:class:`RestrictedUnpickler`, which
- rebuilds tensors and plain containers (a short allowlist of torch's tensor-rebuild functions,
  ``OrderedDict``, ``set``, dtypes);
- turns every other global the pickle names into an :class:`InertObject` subclass, without importing
  its module: building such an object (pickle's NEWOBJ, as for any ``dict`` subclass like
  ``CfgNode``) only stores its items and state as data;
- refuses to *call* such a global (pickle's REDUCE, what ``__reduce__`` returning ``os.system``
  becomes): :class:`CodeExecutionRefused` is raised before anything is called.
"""

from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path

import torch

__all__ = ["CodeExecutionRefused", "InertObject", "RestrictedUnpickler", "load_untrusted"]


class CodeExecutionRefused(pickle.UnpicklingError):
    """The pickle calls a function or class outside the allowlist: loading it would run code from the file."""


class _InertClass(type):
    """Metaclass of the stand-ins: calling one would mean calling the global it replaces, so it refuses."""

    def __call__(cls, *args, **kwargs):
        raise CodeExecutionRefused(f"the pickle calls {cls.pickled_global}")


class InertObject(dict, metaclass=_InertClass):
    """Stands in for an object of a class that the file names but that is never imported (e.g. yacs' CfgNode).

    It is a ``dict`` so that pickled dict items (a CfgNode's entries) land in it; pickled instance
    state goes to ``pickled_state`` and list items to ``pickled_items``. Nothing of the original
    class runs.
    """

    pickled_global = "?"

    def __setstate__(self, state) -> None:
        self.__dict__["pickled_state"] = state

    def append(self, item) -> None:
        self.__dict__.setdefault("pickled_items", []).append(item)

    def extend(self, items) -> None:
        self.__dict__.setdefault("pickled_items", []).extend(items)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The globals a checkpoint of tensors and plain containers needs; ``__builtin__`` is how protocol 2 names builtins."""
    allowed: dict[tuple[str, str], object] = {
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for builtins_module in ("builtins", "__builtin__"):
        allowed |= {(builtins_module, c.__name__): c for c in (set, frozenset, complex)}
    allowed |= {("torch", name): dtype for name in dir(torch) if isinstance(dtype := getattr(torch, name), torch.dtype)}
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that never imports: allowlisted globals are returned, all others become InertObject classes."""

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        return _InertClass(str(name), (InertObject,), {"pickled_global": f"{module}.{name}", "__module__": __name__})


# What torch.load calls on its ``pickle_module``: Unpickler (subclassed to add storages) and load (legacy format headers).
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__=__name__,
    Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load(),
)


def load_untrusted(path: str | Path) -> object:
    """``torch.load`` a file without running code from it: ``weights_only`` first, then the restricted unpickler.

    Raises CodeExecutionRefused if the pickle would call anything outside the allowlist, and the
    errors of ``torch.load`` (``pickle.UnpicklingError``, ``RuntimeError``, ...) for unreadable files.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a global outside torch's allowlist, e.g. a pickled config object
        pass
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
