"""Finding and loading a user's model definition, with errors that name the file and line."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Type

from harness.adapters import api_of
from harness.errors import HarnessError
from harness.trial import PyTorchTrial

MAIN_MODULE = "model_def"
DATA_MODULE = "data"


@dataclass
class ModelDefinition:
    """What the harness found in a model directory."""

    directory: str
    trial_class: Type[PyTorchTrial]
    make_data_loaders: Callable[..., Any]
    download_data: Optional[Callable[..., Any]]


def user_frame(tb: Any, directory: str) -> Optional[str]:
    """'file:line in func' of the innermost traceback frame inside `directory`, if any."""
    found = None
    for frame in traceback.extract_tb(tb):
        if os.path.abspath(frame.filename).startswith(directory + os.sep):
            found = f"{frame.filename}:{frame.lineno} in {frame.name}"
    return found


def _import(directory: str, name: str) -> ModuleType:
    path = os.path.join(directory, name + ".py")
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != path:
        del sys.modules[name]  # a module of the same name from elsewhere (e.g. another `data`)
    try:
        return importlib.import_module(name)
    except SyntaxError as e:
        raise HarnessError(f"syntax error in {e.filename}:{e.lineno}: {e.msg}") from None
    except ImportError as e:
        where = user_frame(e.__traceback__, directory) or path
        raise HarnessError(_import_error_message(e, path, where)) from None
    except Exception as e:  # noqa: BLE001 - any error while importing user code is reported the same way
        where = user_frame(e.__traceback__, directory) or path
        raise HarnessError(f"cannot import {path}: {type(e).__name__}: {e} (at {where})") from None


def _import_error_message(e: ImportError, path: str, where: str) -> str:
    """An ImportError in user code; a name of PEDL's that the `pedl` package lacks is named as such."""
    module = e.name or ""
    if module == "pedl" or module.startswith("pedl."):
        import pedl

        missing = re.search(r"cannot import name '([^']+)'", str(e))
        name = f"{module}.{missing.group(1)}" if missing else module
        return (
            f"{where}: imports {name}, which this harness's pedl package does not provide "
            f"(it provides {pedl.supported_list()})"
        )
    return f"cannot import {path}: {type(e).__name__}: {e} (at {where})"


def _module_file_exists(directory: str, name: str) -> bool:
    return os.path.isfile(os.path.join(directory, name + ".py"))


def _find_trial(module: ModuleType, class_name: Optional[str]) -> Type[PyTorchTrial]:
    where = module.__file__
    if class_name is not None:
        cls = getattr(module, class_name, None)
        if cls is None:
            raise HarnessError(f"{where}: no class '{class_name}' (named by the config's entrypoint)")
        if not (inspect.isclass(cls) and issubclass(cls, PyTorchTrial)):
            raise HarnessError(f"{where}: '{class_name}' is not a PyTorchTrial subclass")
        return cls
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, PyTorchTrial) and obj is not PyTorchTrial
    ]
    local = [c for c in found if c.__module__ == module.__name__]
    candidates = local or found
    if not candidates:
        raise HarnessError(f"{where}: no PyTorchTrial subclass found")
    if len(candidates) > 1:
        names = ", ".join(sorted(c.__name__ for c in candidates))
        raise HarnessError(
            f"{where}: several PyTorchTrial subclasses ({names}); "
            "name one with the config key entrypoint: 'model_def:ClassName'"
        )
    return candidates[0]


def check_trial_class(cls: Type[PyTorchTrial]) -> str:
    """The trial API the class completes; else one error naming, per API, what is missing."""
    return api_of(cls)


def _find_function(modules: Dict[str, ModuleType], name: str) -> Optional[Callable[..., Any]]:
    for module in modules.values():
        fn = getattr(module, name, None)
        if fn is not None:
            if not callable(fn):
                raise HarnessError(f"{module.__file__}: '{name}' is not a function")
            return fn
    return None


def load(directory: str, entrypoint: Optional[str] = None) -> ModelDefinition:
    """Import the model definition in `directory` (a folder holding model_def.py, or that file itself)."""
    if os.path.isfile(directory) and directory.endswith(".py"):
        directory, main = os.path.dirname(directory) or ".", os.path.basename(directory)[:-3]
    else:
        main = MAIN_MODULE
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise HarnessError(f"model definition directory {directory} does not exist")
    class_name = None
    if entrypoint:
        main, _, class_name = entrypoint.partition(":")
    if not _module_file_exists(directory, main):
        raise HarnessError(f"{directory}: no {main}.py (the model definition's main module)")

    # Sibling modules (e.g. `from layers import Flatten`) are importable, as PEDL allowed.
    if directory not in sys.path:
        sys.path.insert(0, directory)
    modules = {main: _import(directory, main)}
    if main != DATA_MODULE and _module_file_exists(directory, DATA_MODULE):
        modules[DATA_MODULE] = _import(directory, DATA_MODULE)

    trial_class = _find_trial(modules[main], class_name)
    check_trial_class(trial_class)
    make_data_loaders = _find_function(modules, "make_data_loaders")
    if make_data_loaders is None:
        raise HarnessError(f"{directory}: no make_data_loaders() in {main}.py or {DATA_MODULE}.py")
    return ModelDefinition(
        directory=directory,
        trial_class=trial_class,
        make_data_loaders=make_data_loaders,
        download_data=_find_function(modules, "download_data"),
    )


def positional_arity(fn: Callable[..., Any]) -> int:
    """The number of positional parameters of a bound method (to accept PEDL's older signatures)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 99
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
