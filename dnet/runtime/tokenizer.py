"""Tokenizers for prompts and streamed text, from mlx_lm's loader and detokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from mlx_lm.tokenizer_utils import _byte_decoder as _gpt2_byte_decoder
from mlx_lm.utils import load_tokenizer as _load_tokenizer

from dnet.errors import InvalidModel
from dnet.runtime.gguf import read_header
from dnet.runtime.gguf_tokenizer import build_tokenizer, special_tokens

# GPT-2's printable stand-ins for bytes, as mlx_lm's BPE detokenizer reads them.
_BYTE_DECODER: dict[str, int] = _gpt2_byte_decoder()


def load_tokenizer(path: str | Path, eos_token_ids: Any = None) -> TokenizerWrapper:
    """The tokenizer of a local model directory or GGUF file, wrapped with a
    streaming detokenizer.

    Raises:
        InvalidModel: the model has no usable tokenizer.
    """
    path = Path(path)
    if path.is_file():
        return _gguf_tokenizer(path, eos_token_ids)
    try:
        return _load_tokenizer(path, eos_token_ids=eos_token_ids)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidModel(f"cannot load the tokenizer of {path}: {exc}") from exc


def _gguf_tokenizer(path: Path, eos_token_ids: Any) -> TokenizerWrapper:
    from transformers import PreTrainedTokenizerFast

    header = read_header(path, vocab=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(header),
        chat_template=header.metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **special_tokens(header),
    )
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    spm = header.metadata.get("tokenizer.ggml.model") == "llama"
    detokenizer = SPMStreamingDetokenizer if spm else BPEStreamingDetokenizer
    return TokenizerWrapper(tokenizer, detokenizer, eos_token_ids=eos_token_ids)


def chat_prompt(tokenizer: TokenizerWrapper, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template."""
    if tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode("\n".join(m["content"] for m in messages)))


def token_bytes(tokenizer: TokenizerWrapper, token_id: int) -> bytes:
    """The raw bytes of one token (a byte-level BPE token may hold part of a
    character, which text alone cannot show)."""
    detokenizer = tokenizer.detokenizer
    if isinstance(detokenizer, BPEStreamingDetokenizer) and token_id < len(detokenizer.tokenmap):
        decoder = _BYTE_DECODER
        piece = detokenizer.tokenmap[token_id]
        if all(c in decoder for c in piece):
            return bytes(decoder[c] for c in piece)
    if isinstance(detokenizer, SPMStreamingDetokenizer) and token_id < len(detokenizer.tokenmap):
        return bytes(detokenizer.tokenmap[token_id]).replace("▁".encode(), b" ")
    return str(tokenizer.decode([token_id])).encode()
