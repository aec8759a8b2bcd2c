"""A GGUF file's tokenizer, built with ``tokenizers`` from its metadata.

A GGUF carries no ``tokenizer.json``: ``tokenizer.ggml.*`` holds the vocabulary,
the BPE merges (or, for SentencePiece vocabularies, each piece's score), each
token's type, the special ids and whether to add BOS, and ``tokenizer.ggml.pre``
names how llama.cpp splits text before byte-level merges. The
splits below are llama.cpp's (``src/llama-vocab.cpp``) for the names dnet knows;
an unknown one is refused rather than guessed, since a wrong split tokenizes
every prompt slightly wrong.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from dnet.errors import InvalidModel
from dnet.models.gguf import GGUFHeader

# GPT-2's split; and the others, with the case-insensitive contractions of their
# tokenizer.json spelled out as llama.cpp does.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")


def _family(names: str, splits: tuple[str, ...], ignore_merges: bool = False, bos: bool = False):
    return {n: (splits, ignore_merges, bos) for n in names.split()}


# tokenizer.ggml.pre → (regex splits in order, ignore_merges, add BOS by default)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    **_family("default", _DEFAULT),
    **_family(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        (_LLAMA3,),
        ignore_merges=True,
        bos=True,
    ),
    **_family("dbrx smaug-bpe", (_LLAMA3,)),
    **_family("gpt-2 phi-2 mpt olmo jais", (_GPT2,)),
    **_family("qwen2 deepseek-r1-qwen stablelm2 megrez hunyuan", (_QWEN2,)),
    **_family("smollm starcoder refact command-r codeshell exaone minerva-7b", (r"\p{N}", _GPT2)),
    **_family("tekken", (_TEKKEN,), ignore_merges=True, bos=True),
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # llama.cpp's token types
MERGEABLE = {NORMAL, USER_DEFINED}


def check_tokenizer(header: GGUFHeader) -> str:
    """The file's tokenizer kind (``gpt2``, or ``llama`` for SentencePiece), once
    it is one dnet can build.

    Raises:
        InvalidModel: another tokenizer model, or an unknown ``pre`` type.
    """
    meta = header.metadata
    where = header.path.name
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return "llama"
    if kind != "gpt2":
        raise InvalidModel(
            f"{where}: tokenizer.ggml.model is {kind!r}; dnet builds byte-level BPE "
            "('gpt2') and SentencePiece ('llama') tokenizers from GGUF files"
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise InvalidModel(
            f"{where}: pre-tokenizer {pre!r} is not one dnet knows "
            f"({', '.join(sorted(PRE_TOKENIZERS))})"
        )
    return kind


def build_tokenizer(header: GGUFHeader) -> Tokenizer:
    """The tokenizer a GGUF file describes, control tokens as special tokens (a
    prompt's ``<|im_start|>`` is one id) and user-defined ones as added tokens, BOS
    prepended when the file (or its kind) says so:

    - ``gpt2``: byte-level BPE over the vocabulary and merges, with llama.cpp's
      split for the file's ``pre`` name;
    - ``llama``: SentencePiece BPE (Llama 2, Mistral): no merges are stored, so
      they come from the vocabulary, ranked by the merged piece's score, which is
      what llama.cpp's SentencePiece tokenizer merges by; spaces become ``▁`` and
      each stretch of text starts with one, as in llama.cpp; bytes outside the
      vocabulary fall back to ``<0xNN>`` tokens.

    Raises:
        InvalidModel: see ``check_tokenizer``; a vocabulary without its merges.
    """
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise InvalidModel(f"{header.path.name} lacks tokenizer.ggml.tokens")
    raw_types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in raw_types] if raw_types is not None else [NORMAL] * len(tokens)
    if check_tokenizer(header) == "llama":
        tokenizer, bos_default = _sentencepiece(header, tokens, types), True
    else:
        tokenizer, bos_default = _byte_level(header, tokens)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False)
         for t, k in zip(tokens, types, strict=False) if k in (CONTROL, UNKNOWN)]
    )  # fmt: skip
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False)
         for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED]
    )  # fmt: skip
    _bos_eos(tokenizer, meta, tokens, bos_default)
    return tokenizer


def _byte_level(header: GGUFHeader, tokens: list[str]) -> tuple[Tokenizer, bool]:
    meta = header.metadata
    splits, ignore_merges, bos_default = PRE_TOKENIZERS[
        str(meta.get("tokenizer.ggml.pre", "default"))
    ]
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise InvalidModel(f"{header.path.name} lacks tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, bos_default


def _sentencepiece(header: GGUFHeader, tokens: list[str], types: list[int]) -> Tokenizer:
    meta = header.metadata
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise InvalidModel(f"{header.path.name} lacks tokenizer.ggml.scores")
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tokenizer = Tokenizer(
        models.BPE(
            vocab,
            sentencepiece_merges(tokens, [float(x) for x in scores], types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # SentencePiece's dummy prefix, on every stretch of text between special tokens
    # as llama.cpp does (a Metaspace pre-tokenizer would skip text that starts with
    # a space, and text after a special token).
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def sentencepiece_merges(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's: every split of a piece into two
    pieces of the vocabulary, best-scored piece first (ties: the longer left part,
    then the vocabulary's order)."""
    ids = {t: i for i, (t, k) in enumerate(zip(tokens, types, strict=False)) if k in MERGEABLE}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], -len(left), ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bos_eos(tokenizer: Tokenizer, meta: dict[str, Any], tokens: list[str], bos: bool) -> None:
    """Prepend BOS / append EOS to encoded text as the file says."""
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    specials, single = [], "$A"
    for add, key, where in ((add_bos, "bos", "front"), (add_eos, "eos", "back")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if not add or token_id is None or not 0 <= int(token_id) < len(tokens):
            continue
        token = tokens[int(token_id)]
        specials.append((token, int(token_id)))
        single = f"{token} {single}" if where == "front" else f"{single} {token}"
    if specials:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B", special_tokens=specials
        )


def special_tokens(header: GGUFHeader) -> dict[str, str | None]:
    """``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` by their text."""
    tokens = header.metadata["tokenizer.ggml.tokens"]
    out: dict[str, str | None] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = header.metadata.get(f"tokenizer.ggml.{key}_token_id")
        valid = token_id is not None and 0 <= int(token_id) < len(tokens)
        out[f"{name}_token"] = tokens[int(token_id)] if token_id is not None and valid else None
    return out
