"""Which install extra provides a missing optional package (the CLI's one-line error).

The core install (`pip install bidirlm`) holds the ops (`bidirlm.kernels`: torch, triton, numpy)
and the merger (safetensors, pyyaml); every other third-party package comes with an extra, see
pyproject.toml. A command that imports a missing one fails with one line naming the extra.
"""

from __future__ import annotations

import importlib.util

# package imported -> the extra that installs it (transformers and the other shared ones: the
# command's own extra, see COMMAND_EXTRAS, else "train")
MODULE_EXTRAS: dict[str, str | None] = {
    "sentence_transformers": "st",
    "mteb": "mteb",
    "PIL": "omni",
    "scipy": "omni",
    "soundfile": None,  # not in any extra: `pip install soundfile` (only .flac audio needs it)
    "tensorboard": "tensorboard",
    "transformers": "",
    "tokenizers": "",
    "huggingface_hub": "",
    "datasets": "",
    "pyarrow": "",
    "matplotlib": "",
}
# command -> the extra that makes all of it work
COMMAND_EXTRAS = {
    "compose": "omni",
    "export": "st",
    "check": "st",
    "demo": "all",
}


# command -> (its extra, the packages it cannot start without): checked before it runs
COMMAND_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", ("transformers",)),
    "pipeline": ("train", ("transformers",)),
    "finetune-sweep": ("train", ("transformers",)),
    "domain-transfer": ("train", ("transformers",)),
    "encode": ("train", ("transformers",)),
    "eval": ("train", ("transformers",)),
    "predict": ("train", ("transformers",)),
    "export": ("st", ("transformers", "sentence_transformers")),
    "check": ("st", ("transformers", "sentence_transformers")),
    "compose": ("omni", ("transformers",)),
    "demo": ("all", ("transformers", "sentence_transformers", "matplotlib")),
}


def installed(package: str) -> bool:
    """Whether `package` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def command_missing(command: str) -> str | None:
    """The one-line message when a package `command` cannot start without is missing."""
    extra, packages = COMMAND_NEEDS.get(command, ("", ()))
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return None
    return (
        f"needs the optional package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
        f"not installed: pip install 'bidirlm[{extra}]'"
    )


def missing_extra(exc: ModuleNotFoundError, command: str | None = None) -> str | None:
    """The one-line message for `exc` when it is an optional package missing, else None."""
    package = (exc.name or "").split(".")[0]
    if package not in MODULE_EXTRAS:
        return None
    extra = MODULE_EXTRAS[package]
    if extra is None:
        install = package
    else:
        install = f"'bidirlm[{extra or COMMAND_EXTRAS.get(command or '', 'train')}]'"
    return f"needs the optional package {package}, not installed: pip install {install}"
