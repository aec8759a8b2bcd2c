"""Which mlx_lm architectures the sliced runtime runs, and their model classes.

A supported architecture is one whose inner model is ``embed_tokens`` → decoder
blocks in ``model.layers`` (each called as ``layer(h, mask, cache)``) → ``norm``, with
the output head in ``lm_head`` or tied to the embeddings. Architectures that scale
embeddings, mix attention kinds or keep extra state are refused rather than run
wrongly.
"""

from __future__ import annotations

import importlib
from typing import Any

from dnet.errors import UnsupportedArchitecture

# model_type → module under mlx_lm.models
SUPPORTED: dict[str, str] = {
    "qwen3": "qwen3",
    "qwen2": "qwen2",
    "llama": "llama",
    "mistral": "llama",
    "deepseek_v2": "deepseek_v2",
}


def model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """The mlx_lm ``Model`` and ``ModelArgs`` classes for ``config``.

    Raises:
        UnsupportedArchitecture: a ``model_type`` outside ``SUPPORTED``, or a variant
            of a supported one that the slice runner cannot run exactly.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported by the sliced runtime; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    layer_types = config.get("layer_types") or ()
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedArchitecture(
            f"{model_type} with layer_types {sorted(set(layer_types))} (sliding-window "
            "attention) is not supported yet"
        )
    module = importlib.import_module(f"mlx_lm.models.{SUPPORTED[model_type]}")
    return module.Model, module.ModelArgs
