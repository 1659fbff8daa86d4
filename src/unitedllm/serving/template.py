"""The prompt template the model was trained with, as a Hugging Face chat template.

Training formats each record with the Dolly/Alpaca template (:func:`unitedllm.training.data.format_prompt`):
the instruction, an optional input block, then ``### Response:``. A chat maps onto it like this: the
last message (from the user) is the instruction; system messages and any earlier turns
(``role: content`` lines) are the input block. The same Jinja text is written into an exported
tokenizer (``tokenizer.apply_chat_template`` gives the training prompt) and renders chats here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CHAT_TEMPLATE", "TEMPLATE_NAME", "TemplateError", "render_chat"]

TEMPLATE_NAME = "dolly-v1"

CHAT_TEMPLATE = (
    "{%- set ns = namespace(instruction='', context=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.last -%}"
    "{%- if message['role'] != 'user' -%}{{ raise_exception('the last message must come from the user') }}"
    "{%- endif -%}"
    "{%- set ns.instruction = message['content'] | trim -%}"
    "{%- elif message['role'] == 'system' -%}"
    "{%- set ns.context = ns.context + [message['content'] | trim] -%}"
    "{%- else -%}"
    "{%- set ns.context = ns.context + [message['role'] ~ ': ' ~ (message['content'] | trim)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set context = ns.context | join('\\n') | trim -%}"
    "{{- 'Below is an instruction that describes a task' -}}"
    "{%- if context -%}{{- ', paired with an input that provides further context' -}}{%- endif -%}"
    "{{- '. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n' -}}"
    "{{- ns.instruction ~ '\\n\\n' -}}"
    "{%- if context -%}{{- '### Input:\\n' ~ context ~ '\\n\\n' -}}{%- endif -%}"
    "{{- '### Response:\\n' -}}"
)


class TemplateError(ValueError):
    """A chat the template cannot render (raised by its ``raise_exception``)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The training-format prompt for a chat (``role``/``content`` mappings with text content)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not messages:
        raise TemplateError("a chat needs at least one message")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(CHAT_TEMPLATE).render(messages=list(messages))
