"""Finding and loading a user's model definition, with errors that name the file and line.

Where the trial class and the data functions are, first match wins (each PEDL generation had its form):
1. the config's ``entrypoints:`` section (PEDL v0.11), key by key;
2. the config's ``entrypoint: module:Class`` (Determined), for the trial class;
3. a ``.py`` file given instead of the directory: its trial class;
4. the directory's ``__init__.py``, where it exports a PyTorchTrial subclass (PEDL v0.10): that class, and
   the ``make_data_loaders`` / ``download_data`` it exports;
5. ``model_def.py``'s trial class; ``make_data_loaders`` / ``download_data`` from it, then from ``data.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Tuple, Type

from harness.api.context import ContextTrial
from harness.api.trial import PyTorchTrial, api_of, is_trial_class
from harness.errors import HarnessError, check_model_path, describe

if TYPE_CHECKING:
    from harness.config import EntrypointsConfig, ExperimentConfig

MAIN_MODULE = "model_def"
DATA_MODULE = "data"
INIT_FILE = "__init__.py"
PACKAGE = "__model_definition__"  # the module name the directory's __init__.py runs under
LOADERS, DOWNLOAD = "make_data_loaders", "download_data"


@dataclass
class ModelDefinition:
    """What the harness found in a model directory."""

    directory: str
    trial_class: Type[PyTorchTrial]
    make_data_loaders: Optional[Callable[..., Any]]  # None: the trial builds its loaders (Determined's)
    download_data: Optional[Callable[..., Any]]
    # PEDL's 3-argument forms (experiment_config, hparams, download_data_dir), told by the signature
    loaders_take_dir: bool = False
    download_takes_dir: bool = False
    # A Trainer script's trial and context, made by the script (harness/trainer.py): used as they are.
    prebuilt: Optional[Tuple[Any, Any]] = None


def user_frame(tb: Any, directory: str) -> Optional[str]:
    """'file:line in func' of the innermost traceback frame inside `directory`, if any."""
    found = None
    for frame in traceback.extract_tb(tb):
        if os.path.abspath(frame.filename).startswith(directory + os.sep):
            found = f"{frame.filename}:{frame.lineno} in {frame.name}"
    return found


def _import(directory: str, name: str) -> ModuleType:
    """Import module `name` (dotted: a package of the directory) of the model definition in `directory`."""
    path = _module_file(directory, name) or os.path.join(directory, name + ".py")
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__file__", None) != path:
        del sys.modules[name]  # a module of the same name from elsewhere (e.g. another `data`)
    with _reported(directory, path):
        return importlib.import_module(name)


def _import_package(directory: str) -> ModuleType:
    """The model directory's ``__init__.py`` (PEDL v0.10's entry point), run as a package.

    Its sibling modules stay importable by their own names (``from data import ...``, as PEDL ran it), and
    relative imports (``from .data import ...``) work too.
    """
    path = os.path.join(directory, INIT_FILE)
    for name in _sibling_modules(directory):  # what `from data import` must find: this directory's
        cached = sys.modules.get(name)
        if cached is not None and os.path.dirname(getattr(cached, "__file__", None) or "") != directory:
            if not _installed(cached):
                del sys.modules[name]
    spec = importlib.util.spec_from_file_location(PACKAGE, path, submodule_search_locations=[directory])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    with _reported(directory, path):
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _reported(directory: str, path: str) -> Iterator[None]:
    """Any error while importing user code, as one line naming the file (and the user's line)."""
    try:
        yield
    except SyntaxError as e:
        raise HarnessError(f"syntax error in {e.filename}:{e.lineno}: {e.msg}") from None
    except ImportError as e:
        where = user_frame(e.__traceback__, directory) or path
        raise HarnessError(_import_error_message(e, path, where)) from None
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001 - any error while importing user code is reported the same way
        where = user_frame(e.__traceback__, directory) or path
        raise HarnessError(f"cannot import {path}: {describe(e)} (at {where})") from None


def _sibling_modules(directory: str) -> List[str]:
    names = []
    for entry in os.listdir(directory):
        if entry.endswith(".py") and entry != INIT_FILE:
            names.append(entry[:-3])
        elif os.path.isfile(os.path.join(directory, entry, INIT_FILE)):
            names.append(entry)
    return names


def _installed(module: ModuleType) -> bool:
    """A module of the Python installation (builtin, stdlib, site-packages): never unloaded for a user's."""
    file = getattr(module, "__file__", None)
    if not file:
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(os.path.abspath(file).startswith(os.path.abspath(r) + os.sep) for r in roots)


def _import_error_message(e: ImportError, path: str, where: str) -> str:
    """An ImportError in user code; a name of PEDL's or Determined's that the harness's `pedl` or
    `determined` package lacks is named as such."""
    module = e.name or ""
    top = module.split(".")[0]
    if top in ("pedl", "determined"):
        package = importlib.import_module(top)  # the harness's own (harness/compat for determined)
        missing = re.search(r"cannot import name '([^']+)'", str(e))
        name = f"{module}.{missing.group(1)}" if missing else module
        return (
            f"{where}: imports {name}, which this harness's {top} package does not provide "
            f"(it provides {package.supported_list()})"
        )
    return f"cannot import {path}: {describe(e)} (at {where})"


def _module_file(directory: str, name: str) -> Optional[str]:
    """The file of module `name` (dotted: in subfolders) inside `directory`, if there is one."""
    base = os.path.join(directory, *name.split("."))
    for path in (base + ".py", os.path.join(base, INIT_FILE)):
        if os.path.isfile(path):
            return path
    return None


def _find_trial(module: ModuleType, class_name: Optional[str], key: str = "entrypoint") -> Type[PyTorchTrial]:
    where = module.__file__
    if class_name is not None:
        cls = getattr(module, class_name, None)
        if cls is None:
            raise HarnessError(f"{where}: no class '{class_name}' (named by the config key '{key}')")
        if not is_trial_class(cls):
            raise HarnessError(f"{where}: '{class_name}' is not a PyTorchTrial subclass")
        return cls
    candidates = _trial_classes(module)
    if not candidates:
        raise HarnessError(f"{where}: no PyTorchTrial subclass found")
    if len(candidates) > 1:
        names = ", ".join(sorted(c.__name__ for c in candidates))
        raise HarnessError(
            f"{where}: several PyTorchTrial subclasses ({names}); "
            "name one with the config key entrypoint: 'model_def:ClassName'"
        )
    return candidates[0]


def _trial_classes(module: ModuleType) -> List[Type[PyTorchTrial]]:
    """The module's PyTorchTrial subclasses: those it defines, else those it imports."""
    found = [obj for obj in vars(module).values() if is_trial_class(obj)]
    local = [c for c in found if c.__module__ == module.__name__]
    return local or found


def check_trial_class(cls: Type[PyTorchTrial]) -> str:
    """The trial API the class completes; else one error naming, per API, what is missing."""
    return api_of(cls)


def _find_function(modules: List[ModuleType], name: str) -> Optional[Callable[..., Any]]:
    for module in modules:
        fn = getattr(module, name, None)
        if fn is not None:
            if not callable(fn):
                raise HarnessError(f"{module.__file__}: '{name}' is not a function")
            return fn
    return None


def _named(directory: str, key: str, value: str, what: str) -> Any:
    """What the config key `key` names as 'module:name', imported from the model definition."""
    module_name, _, name = value.partition(":")
    path = _module_file(directory, module_name)
    if path is None:
        looked = os.path.join(directory, *module_name.split(".")) + ".py"
        raise HarnessError(
            f"config key '{key}': no module '{module_name}' in {directory} (looked for {looked})"
        )
    obj = getattr(_import(directory, module_name), name, None)
    if obj is None:
        raise HarnessError(f"config key '{key}': {path} has no '{name}' (the {what} named by '{value}')")
    if not callable(obj):
        raise HarnessError(f"config key '{key}': '{value}' is a {type(obj).__name__}, not a {what}")
    return obj


def _no_module(directory: str, key: str, module: str) -> str:
    looked = os.path.join(directory, *module.split(".")) + ".py"
    return f"config key '{key}': no module '{module}' in {directory} (looked for {looked})"


def load_for(model_def: str, config: ExperimentConfig) -> ModelDefinition:
    """Import the model definition the way `config` says, with the trial's context already set.

    PEDL v0.10's ``__init__.py`` read the data config while it was imported (``pedl.get_data_config()``).
    """
    from harness.api import trial as trial_api

    trial_api._set_context(config.hyperparameters, None, config.as_dict())
    return load(model_def, config.entrypoint, config.entrypoints)


COMPAT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat")


def use_compat_packages() -> None:
    """Make the harness's `determined` package the one model definitions import, ahead of a real
    Determined installation (whose trials need its cluster); a module already imported is replaced."""
    if sys.path[:1] != [COMPAT_DIR]:
        sys.path[:] = [COMPAT_DIR] + [p for p in sys.path if p != COMPAT_DIR]
    loaded = sys.modules.get("determined")
    if loaded is not None and not (getattr(loaded, "__file__", "") or "").startswith(COMPAT_DIR):
        for name in [m for m in sys.modules if m == "determined" or m.startswith("determined.")]:
            del sys.modules[name]


def load(
    directory: str, entrypoint: Optional[str] = None, entrypoints: Optional[EntrypointsConfig] = None
) -> ModelDefinition:
    """Import the model definition in `directory` (a folder holding model_def.py, or a .py file in it);
    where each part is found: the module docstring."""
    given_file = os.path.isfile(directory) and directory.endswith(".py")
    if given_file:
        directory, main = os.path.dirname(directory) or ".", os.path.basename(directory)[:-3]
    else:
        main = MAIN_MODULE
    directory = os.path.abspath(directory)
    check_model_path(directory)
    if not os.path.isdir(directory):
        raise HarnessError(f"model definition directory {directory} does not exist")
    trial_key = getattr(entrypoints, "trial_class", None)
    loaders_key = getattr(entrypoints, "data_loaders_function", None)
    download_key = getattr(entrypoints, "download_data_function", None)

    # The harness's `determined` package (harness/compat) before any installed one; then sibling modules
    # (e.g. `from layers import Flatten`) are importable, as PEDL allowed.
    use_compat_packages()
    if directory not in sys.path:
        sys.path.insert(0, directory)
    package, class_name, key = None, None, "entrypoint"
    if trial_key:
        (main, _, class_name), key = trial_key.partition(":"), "entrypoints.trial_class"
    elif entrypoint:
        main, _, class_name = entrypoint.partition(":")
    elif not given_file and os.path.isfile(os.path.join(directory, INIT_FILE)):
        package = _import_package(directory)
        if not _trial_classes(package):
            package = None  # an __init__.py that exports no trial (empty, or v0.11's): not the entry point
    if package is not None:
        trial_class = _find_trial(package, None)
    else:
        if _module_file(directory, main) is None:
            if trial_key:
                raise HarnessError(_no_module(directory, key, main))
            raise HarnessError(f"{directory}: no {main}.py (the model definition's main module)")
        trial_class = _find_trial(_import(directory, main), class_name, key)
    check_trial_class(trial_class)
    if issubclass(trial_class, ContextTrial):  # Determined's: the trial builds its own loaders
        return ModelDefinition(directory=directory, trial_class=trial_class, make_data_loaders=None,
                               download_data=None)  # fmt: skip

    # The data functions: named by the config, exported by __init__.py, or in the main module or data.py.
    modules = [] if package is None else [package]
    for name in (main, DATA_MODULE):
        if name not in (m.__name__ for m in modules) and _module_file(directory, name) is not None:
            modules.append(_import(directory, name))
    if loaders_key:
        make_data_loaders = _named(directory, "entrypoints.data_loaders_function", loaders_key, "function")
    else:
        make_data_loaders = _find_function(modules, LOADERS)
    if make_data_loaders is None:
        where = f"{INIT_FILE}, " if package is not None else ""
        raise HarnessError(f"{directory}: no make_data_loaders() in {where}{main}.py or {DATA_MODULE}.py")
    if download_key:
        download_data = _named(directory, "entrypoints.download_data_function", download_key, "function")
    else:
        download_data = _find_function(modules, DOWNLOAD)
    loaders_take_dir = _takes_download_dir(make_data_loaders, LOADERS)
    if loaders_take_dir and download_data is None:
        raise HarnessError(
            f"{_where(make_data_loaders)}: make_data_loaders() takes download_data_dir, but the model "
            "definition has no download_data() to make it; add one, or drop the third argument"
        )
    return ModelDefinition(
        directory=directory,
        trial_class=trial_class,
        make_data_loaders=make_data_loaders,
        download_data=download_data,
        loaders_take_dir=loaders_take_dir,
        download_takes_dir=download_data is not None and _takes_download_dir(download_data, DOWNLOAD),
    )


def _takes_download_dir(fn: Callable[..., Any], what: str) -> bool:
    """PEDL's data functions took (experiment_config, hparams), or one generation (experiment_config,
    hparams, download_data_dir): which one, from the signature; anything else is refused here."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: assume the common form
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    required_kw = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if len(positional) >= 3 and len(required) <= 3 and not required_kw:
        return True
    if len(positional) >= 2 and len(required) <= 2 and not required_kw:
        return False
    shown = ", ".join(p.name for p in params)
    raise HarnessError(
        f"{_where(fn)}: {what}({shown}) does not take the harness's arguments; write "
        f"{what}(experiment_config, hparams) or {what}(experiment_config, hparams, download_data_dir)"
    )


def _where(fn: Callable[..., Any]) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        return getattr(fn, "__qualname__", repr(fn))


def positional_arity(fn: Callable[..., Any]) -> int:
    """The number of positional parameters of a bound method (to accept PEDL's older signatures)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 99
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
