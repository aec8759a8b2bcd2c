"""The head's tokenizer (tokenizers + Jinja, no MLX) against mlx_lm's, which wraps
transformers: the same prompt ids, chat prompts, EOS ids and streamed text."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer as mlx_lm_tokenizer

from dnet.errors import InvalidRequest
from dnet.models.tokenizer import load_tokenizer

from .gguf_files import write_gguf

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass? 🌱 naïve"},
    ],
]
TEXTS = ["The fox and the crow.", "café déjà vu — 東京 🦊 ∑x²\n\n  spaces", "<|im_end|> after"]


def reference(path: Path) -> TokenizerWrapper:
    """mlx_lm's tokenizer: transformers' for a directory, and for a GGUF file the
    same backend dnet builds, under transformers' template engine."""
    if path.is_dir():
        return mlx_lm_tokenizer(path)
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
    from transformers import PreTrainedTokenizerFast

    ours = load_tokenizer(path)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=ours.backend,
        chat_template=ours.chat_template,
        clean_up_tokenization_spaces=False,
        **ours.special,
    )
    return TokenizerWrapper(fast, BPEStreamingDetokenizer)


@pytest.fixture(params=["directory", "gguf"])
def model(request, tiny_model, tmp_path) -> Path:
    source = tiny_model(arch="qwen3", layers=2)
    if request.param == "directory":
        return Path(source)
    return write_gguf(source, tmp_path / "m.gguf", "F32")


def test_prompts_and_chats_match_mlx_lm(model):
    ours, theirs = load_tokenizer(model), reference(model)
    for text in TEXTS:
        assert ours.encode(text) == list(theirs.encode(text)), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    for chat in CHATS:
        expected = list(theirs.apply_chat_template(chat, add_generation_prompt=True))
        assert ours.chat_prompt(chat) == expected
    assert len(ours) == len(theirs)


def test_eos_ids_join_the_configs_to_the_tokenizers(tiny_model):
    source = Path(tiny_model(arch="qwen3", layers=2))
    assert load_tokenizer(source).eos_token_ids == mlx_lm_tokenizer(source).eos_token_ids
    assert load_tokenizer(source, eos_token_ids=[5, 6]).eos_token_ids == (
        mlx_lm_tokenizer(source, eos_token_ids=[5, 6]).eos_token_ids
    )


def test_streamed_text_matches_mlx_lm_token_by_token(model):
    ours, theirs = load_tokenizer(model), reference(model)
    ids = ours.encode(" ".join(TEXTS))
    stream, detok = ours.stream(), theirs.detokenizer
    detok.reset()
    mine, reference_text = [], ""
    for i in ids:
        mine.append(stream.add(i))
        detok.add_token(i)
        assert "\ufffd" not in mine[-1]  # a character's bytes wait for each other
    detok.finalize()
    reference_text = detok.text
    assert "".join(mine) + stream.finish() == reference_text
    plain = " ".join(TEXTS[:2])
    assert ours.byte_level
    assert b"".join(ours.token_bytes(i) for i in ours.encode(plain)) == plain.encode()


def test_a_cut_off_character_is_flushed_at_the_end(model):
    ours = load_tokenizer(model)
    ids = ours.encode("fox 🦊")
    assert len(ids) > len(ours.encode("fox")) + 1  # the emoji is several byte tokens
    stream = ours.stream()
    text = "".join(stream.add(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert text.startswith("fox") and "\ufffd" not in text
    assert stream.finish().endswith("\ufffd")
    assert stream.finish() == ""


def test_a_template_that_raises_is_a_request_error(tmp_path, tiny_model):
    import json
    import shutil

    source = Path(tiny_model(arch="qwen3", layers=2))
    copy = tmp_path / "m"
    shutil.copytree(source, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(copy)
    assert tokenizer.decode(tokenizer.chat_prompt([{"role": "user", "content": "hi"}])) == "hi"
    with pytest.raises(InvalidRequest, match="user first"):
        tokenizer.chat_prompt([{"role": "system", "content": "x"}])
