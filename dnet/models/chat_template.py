"""Chat templates rendered with Jinja in a sandbox, as Hugging Face's tokenizers
render them (same environment options, filters and globals), so the head builds the
same prompt text without transformers or MLX.

Templates come from downloaded models and are untrusted code: the immutable
sandbox keeps them from touching Python internals.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dnet.errors import InvalidModel, InvalidRequest


class _Generation(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` marks an assistant turn for training
    masks; here it only renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """Raises:
    InvalidModel: the template does not parse.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise InvalidModel(f"the model's chat template does not parse: {exc}") from None


def render_chat(
    source: str, messages: list[dict[str, str]], special_tokens: dict[str, str | None]
) -> str:
    """The prompt text of ``messages``, ready for the assistant's answer.

    Raises:
        InvalidRequest: the template refused the conversation (``raise_exception``),
            e.g. roles out of the order it accepts.
    """
    try:
        return compile_template(source).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **special_tokens,
        )
    except jinja2.TemplateError as exc:
        raise InvalidRequest(
            f"the model's chat template refused the messages: {exc}", "messages"
        ) from None
