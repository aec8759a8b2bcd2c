"""A GGUF file's tokenizer, built with ``tokenizers`` from its metadata.

A GGUF carries no ``tokenizer.json``: ``tokenizer.ggml.*`` holds the vocabulary,
the BPE merges, each token's type, the special ids and whether to add BOS, and
``tokenizer.ggml.pre`` names how llama.cpp splits text before the merges. The
splits below are llama.cpp's (``src/llama-vocab.cpp``) for the names dnet knows;
an unknown one is refused rather than guessed, since a wrong split tokenizes
every prompt slightly wrong.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from dnet.errors import InvalidModel
from dnet.runtime.gguf import GGUFHeader

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
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def check_tokenizer(header: GGUFHeader) -> str:
    """The file's pre-tokenizer name, once its tokenizer is one dnet can build.

    Raises:
        InvalidModel: a tokenizer model other than ``gpt2`` (byte-level BPE), or an
            unknown ``pre`` type.
    """
    meta = header.metadata
    where = header.path.name
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InvalidModel(
            f"{where}: tokenizer.ggml.model is {kind!r}; dnet builds byte-level BPE "
            "('gpt2') tokenizers from GGUF files (SentencePiece ones such as Llama 2's "
            "are not supported yet)"
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise InvalidModel(
            f"{where}: pre-tokenizer {pre!r} is not one dnet knows "
            f"({', '.join(sorted(PRE_TOKENIZERS))})"
        )
    return pre


def build_tokenizer(header: GGUFHeader) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF file describes: its vocabulary and
    merges, llama.cpp's split for its ``pre`` name, control tokens as special
    tokens (a prompt's ``<|im_start|>`` is one id) and user-defined ones as added
    tokens, and BOS prepended when the file (or its ``pre`` type) says so.

    Raises:
        InvalidModel: see ``check_tokenizer``; a vocabulary without its merges.
    """
    meta = header.metadata
    where = header.path.name
    splits, ignore_merges, bos_default = PRE_TOKENIZERS[check_tokenizer(header)]
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise InvalidModel(f"{where} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        types = [int(t) for t in types]
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False)
             for t, k in zip(tokens, types, strict=False) if k == CONTROL]
        )  # fmt: skip
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False)
             for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED]
        )  # fmt: skip
    _bos_eos(tokenizer, meta, tokens, bos_default)
    return tokenizer


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
