"""Tokenizers built from GGUF metadata: the same ids as the tokenizer.json they
came from, the real SmolLM2 vocabulary's tokens, special tokens, streaming."""

from __future__ import annotations

from importlib import resources

import gguf
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dnet.errors import InvalidModel
from dnet.models.gguf import read_header
from dnet.models.gguf_tokenizer import build_tokenizer
from dnet.models.model_dir import open_model_dir
from dnet.models.tokenizer import load_tokenizer

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
        assert b"".join(smol.token_bytes(i) for i in ids) == text.encode()
        assert all(smol.backend.id_to_token(i) == vocab[i] for i in ids)
    # SmolLM2 splits digits one by one (llama.cpp's "smollm" split).
    digits = smol.encode("2024")
    assert len(digits) == 4


def test_smollm2_streams_text_and_renders_its_chat_template(smol):
    ids = smol.encode(TEXTS[3])
    stream = smol.stream()
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.finish())
    assert "".join(pieces) == TEXTS[3]
    prompt = smol.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert smol.decode(prompt) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert smol.eos_token_ids == {2}


def test_unknown_splits_and_tokenizer_kinds_are_refused(tiny_model, tmp_path):
    path = write_gguf(
        tiny_model(arch="qwen3", layers=2), tmp_path / "m.gguf", "Q8_0", pre="mystery"
    )
    with pytest.raises(InvalidModel, match="pre-tokenizer 'mystery'"):
        open_model_dir(path)  # at prepare time, before any peer loads a layer
    with pytest.raises(InvalidModel, match="pre-tokenizer 'mystery'"):
        build_tokenizer(read_header(path, vocab=True))
    header = read_header(path, vocab=True)
    header.metadata["tokenizer.ggml.model"] = "bert"
    with pytest.raises(InvalidModel, match="'bert'"):
        build_tokenizer(header)


def llama_cpp_sentencepiece(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenization (``llm_tokenizer_spm_session``),
    spelled out: a leading space, spaces as ▁, then merge the adjacent pair whose
    joined piece scores best (the leftmost on ties) until none is a piece; what is
    left unknown goes out as <0xNN> byte tokens."""
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in vocab and (best is None or scores[vocab[joined]] > best[0]):
                best = (scores[vocab[joined]], i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        if s in vocab:
            ids.append(vocab[s])
        else:
            ids += [vocab[f"<0x{b:02X}>"] for b in s.encode()]
    return ids


def sentencepiece_gguf(path, pieces: list[str]) -> dict[str, int]:
    """A GGUF holding a SentencePiece vocabulary as llama.cpp's converter writes
    one: <unk>, <s>, </s>, the 256 byte tokens, then pieces scored by their rank."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t: i for i, t in enumerate(tokens)}


def test_a_sentencepiece_vocabulary_tokenizes_as_llama_cpp_does(tmp_path):
    # Pieces learned from dnet's corpus by a BPE trainer over ▁-joined words.
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = resources.files("dnet.runtime").joinpath("data/corpus.txt").read_text("utf-8")
    learner.train_from_iterator(corpus.splitlines(), trainer)
    learned = learner.get_vocab()
    pieces = sorted(learned, key=lambda t: (len(t) > 1, learned[t]))  # chars, then merge order
    vocab = sentencepiece_gguf(tmp_path / "spm.gguf", pieces)
    header = read_header(tmp_path / "spm.gguf", vocab=True)
    scores = [float(x) for x in header.metadata["tokenizer.ggml.scores"]]
    tokenizer = load_tokenizer(tmp_path / "spm.gguf")
    texts = [*filter(None, corpus.splitlines()[:60]), *TEXTS[:4], "naïve 東京 🦊 fox"]
    for text in texts:
        ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
        assert ids == llama_cpp_sentencepiece(text, vocab, scores), text
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text)[0] == 1  # <s> first, as llama.cpp adds it
    # Text after a control token starts with SentencePiece's space again (llama.cpp).
    spm = llama_cpp_sentencepiece
    assert tokenizer.backend.encode("The fox</s>The crow", add_special_tokens=False).ids == (
        [*spm("The fox", vocab, scores), 2, *spm("The crow", vocab, scores)]
    )
    # Streaming detokenization, byte tokens included.
    ids = tokenizer.backend.encode("naïve 東京 🦊 fox", add_special_tokens=False).ids
    assert vocab["<0xF0>"] in ids  # the fox emoji is not a piece: it goes out as bytes
    stream = tokenizer.stream()
    text = "".join(stream.add(i) for i in ids) + stream.finish()
    assert text == "naïve 東京 🦊 fox"
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == " naïve 東京 🦊 fox".encode()
