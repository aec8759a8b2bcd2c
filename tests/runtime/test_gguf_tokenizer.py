"""Tokenizers built from GGUF metadata: the same ids as the tokenizer.json they
came from, the real SmolLM2 vocabulary's tokens, special tokens, streaming."""

from __future__ import annotations

from importlib import resources

import pytest

from dnet.errors import InvalidModel
from dnet.runtime.gguf import read_header
from dnet.runtime.gguf_tokenizer import build_tokenizer
from dnet.runtime.model_dir import open_model_dir
from dnet.runtime.tokenizer import chat_prompt, load_tokenizer, token_bytes

from .gguf_files import write_gguf
from .test_gguf import smollm2

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "Numbers 1234567 and 3.14159; don't, we'll, I'M",
    "Unicode: café déjà vu — naïve 東京 🦊 ∑x²",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x ** 2  # done",
]


def test_a_tokenizer_json_survives_the_trip_through_gguf_metadata(tiny_model, tmp_path):
    source = tiny_model(arch="qwen3", layers=2)
    original = load_tokenizer(source)
    converted = load_tokenizer(write_gguf(source, tmp_path / "m.gguf", "Q8_0"))
    corpus = resources.files("dnet.runtime").joinpath("data/corpus.txt").read_text("utf-8")
    lines = [*corpus.splitlines(keepends=True)[:40], *TEXTS]
    for text in lines:
        assert converted.encode(text) == original.encode(text), text
    assert converted.eos_token_ids == original.eos_token_ids
    assert len(converted) == len(original)


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(smollm2(), eos_token_ids=2)


def test_smollm2_tokens_spell_the_text_from_the_files_vocabulary(smol):
    vocab = read_header(smollm2(), vocab=True).metadata["tokenizer.ggml.tokens"]
    for text in TEXTS:
        ids = smol.encode(text)
        assert all(0 <= i < len(vocab) for i in ids)
        assert smol.decode(ids) == text
        if "<|im_start|>" in text:
            assert ids.count(1) == 2 and ids.count(2) == 1  # each special token is one id
            continue
        # Every piece is a vocabulary entry, and the pieces' bytes are the text's.
        assert b"".join(token_bytes(smol, i) for i in ids) == text.encode()
        assert all(smol.convert_ids_to_tokens(i) == vocab[i] for i in ids)
    # SmolLM2 splits digits one by one (llama.cpp's "smollm" split).
    digits = smol.encode("2024")
    assert len(digits) == 4


def test_smollm2_streams_text_and_renders_its_chat_template(smol):
    ids = smol.encode(TEXTS[3])
    detok = smol.detokenizer
    detok.reset()
    pieces = []
    for i in ids:
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == TEXTS[3]
    prompt = chat_prompt(smol, [{"role": "user", "content": "What is the capital of France?"}])
    assert smol.decode(prompt) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert smol.eos_token_ids == {2}


def test_unknown_splits_and_sentencepiece_vocabularies_are_refused(tiny_model, tmp_path):
    path = write_gguf(
        tiny_model(arch="qwen3", layers=2), tmp_path / "m.gguf", "Q8_0", pre="mystery"
    )
    with pytest.raises(InvalidModel, match="pre-tokenizer 'mystery'"):
        open_model_dir(path)  # at prepare time, before any peer loads a layer
    with pytest.raises(InvalidModel, match="pre-tokenizer 'mystery'"):
        build_tokenizer(read_header(path, vocab=True))
    header = read_header(path, vocab=True)
    header.metadata["tokenizer.ggml.model"] = "llama"
    with pytest.raises(InvalidModel, match="SentencePiece"):
        build_tokenizer(header)
