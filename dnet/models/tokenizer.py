"""A model's tokenizer for the head: ``tokenizers`` for ids, Jinja for the chat
template, ``DecodeStream`` for streamed text. No transformers, no MLX.

Loaded from a model directory (``tokenizer.json`` with ``tokenizer_config.json``)
or built from a GGUF file's metadata.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import processors
from tokenizers.decoders import DecodeStream

from dnet.errors import InvalidModel
from dnet.models.chat_template import render_chat
from dnet.models.gguf import read_header
from dnet.models.gguf_tokenizer import build_tokenizer, special_tokens

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (byte-level BPE vocabularies), reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()


class Tokenizer:
    """Encode prompts, render chats, and stream text of one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        chat_template: str | None,
        special: dict[str, str | None],
        eos_token_ids: Iterable[int],
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special = special
        self.eos_token_ids = frozenset(eos_token_ids)
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder else {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self.byte_level = "ByteLevel" in kinds

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token can stand for (an upper bound): a text
        longer than ``context * max_token_bytes`` cannot fit ``context`` tokens."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        if self.byte_level:  # one character per byte
            return max(map(len, vocab), default=1)
        return max((len(p.encode()) for p in vocab), default=1)

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the model's BOS/EOS where it adds them."""
        return list(self.backend.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=False))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template (the
        contents joined by newlines when the model has none).

        Raises:
            InvalidRequest: the template refused the messages.
        """
        if self.chat_template is None:
            return self.encode("\n".join(m["content"] for m in messages))
        text = render_chat(self.chat_template, messages, self.special)
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: a byte-level token may hold part of a
        character, which its text cannot show."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        if self.byte_level:  # an added token, kept as its text
            return self.decode([token_id]).encode()
        byte = _BYTE_PIECE.match(piece)  # SentencePiece's byte fallback
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()

    def stream(self) -> TextStream:
        return TextStream(self)


class TextStream:
    """Text of tokens as they arrive: ``add`` returns what each token completes
    (empty while a character's bytes are incomplete); ``finish`` the rest."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self._ids: list[int] = []
        self._emitted = 0  # characters returned so far
        self._held = False

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        piece = self._stream.step(self._tokenizer.backend, token_id)
        self._held = piece is None
        if piece is None:
            return ""
        self._emitted += len(piece)
        return str(piece)

    def finish(self) -> str:
        """What is held back at the end (an incomplete character, as U+FFFD)."""
        if not self._held:
            return ""
        self._held = False
        text = self._tokenizer.decode(self._ids)
        rest, self._emitted = text[self._emitted :], len(text)
        return rest


def load_tokenizer(path: str | Path, eos_token_ids: Any = None) -> Tokenizer:
    """The tokenizer of a local model directory or GGUF file. ``eos_token_ids``
    (the config's ``eos_token_id``: an id or a list) join the tokenizer's own EOS.

    Raises:
        InvalidModel: the model has no usable tokenizer.
    """
    path = Path(path)
    backend, template, special = _from_gguf(path) if path.is_file() else _from_directory(path)
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = set(eos_token_ids or [])
    if special.get("eos_token") is not None:
        token_id = backend.token_to_id(str(special["eos_token"]))
        if token_id is not None:
            eos.add(token_id)
    return Tokenizer(backend, chat_template=template, special=special, eos_token_ids=eos)


def _from_gguf(path: Path) -> tuple[Backend, str | None, dict[str, str | None]]:
    header = read_header(path, vocab=True)
    template = header.metadata.get("tokenizer.chat_template")
    return build_tokenizer(header), template, special_tokens(header)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"cannot read {path.name}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _from_directory(path: Path) -> tuple[Backend, str | None, dict[str, str | None]]:
    try:
        backend = Backend.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises plain Exceptions
        raise InvalidModel(f"cannot load the tokenizer of {path}: {exc}") from None
    config = _read_json(path / "tokenizer_config.json")
    fallback = _read_json(path / "special_tokens_map.json")
    special = {n: _token_text(config.get(n, fallback.get(n))) for n in SPECIAL_NAMES}
    _llama_bos_eos(backend, config, special)
    return backend, _chat_template(path, config), special


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The default template: ``chat_template.jinja``, ``chat_template.json`` or the
    tokenizer config's (a string, or a list of named templates)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template")
    template = template if template is not None else config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _llama_bos_eos(backend: Backend, config: dict[str, Any], special: dict) -> None:
    """Llama-family tokenizers add BOS/EOS by the config's flags, not by the
    post-processor saved in tokenizer.json (as transformers' LlamaTokenizerFast)."""
    if not str(config.get("tokenizer_class", "")).startswith(("Llama", "Gemma")):
        return
    single, specials = "$A", []
    for flag, name, default in (
        ("add_bos_token", "bos_token", True),
        ("add_eos_token", "eos_token", False),
    ):
        token = special.get(name)
        token_id = backend.token_to_id(token) if token else None
        if not config.get(flag, default) or token_id is None:
            continue
        specials.append((token, token_id))
        single = f"{token} {single}" if name == "bos_token" else f"{single} {token}"
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=specials
    )
