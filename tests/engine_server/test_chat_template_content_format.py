"""--chat-template-content-format: message content reaches the template as one string or as a list of parts
(vLLM's "string" and "openai"), "auto" reading which one the template iterates; the router, rebuilding the
renderer from the engine's /v1/tokenizer_info, renders the same text."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models

from kubellm.prompt import PromptRenderer, TokenizerInfo, detect_content_format

PARTS_TEMPLATE = (
    "{% for message in messages %}<{{ message.role }}>"
    "{% for part in message.content %}[{{ part.type }}:{{ part.text }}]{% endfor %}{% endfor %}"
)
PARTS_TEMPLATE_ITEM = PARTS_TEMPLATE.replace("message.content", "message['content']")
STRING_TEMPLATE = "{% for message in messages %}<{{ message.role }}>{{ message.content }}{% endfor %}"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
]


def _renderer(template: str, content_format: str = "auto") -> PromptRenderer:
    info = TokenizerInfo(
        tokenizer_json=Tokenizer(models.BPE()).to_str(),
        chat_template=template,
        chat_template_content_format=content_format,
    )
    return PromptRenderer(TokenizerInfo.model_validate_json(info.model_dump_json()))  # as a router receives it


@pytest.mark.parametrize(
    ("template", "expected"),
    [(PARTS_TEMPLATE, "openai"), (PARTS_TEMPLATE_ITEM, "openai"), (STRING_TEMPLATE, "string"), ("{% bad", "string")],
)
def test_auto_detects_what_the_template_iterates(template: str, expected: str) -> None:
    assert detect_content_format(template) == expected


def test_openai_format_gives_the_template_a_list_of_parts() -> None:
    assert (
        _renderer(PARTS_TEMPLATE).render_chat(MESSAGES, False) == "<system>[text:Be brief.]<user>[text:Hi][text:there]"
    )
    assert _renderer(PARTS_TEMPLATE, "openai").render_chat(MESSAGES, False) == (
        "<system>[text:Be brief.]<user>[text:Hi][text:there]"
    )


def test_string_format_joins_the_parts() -> None:
    assert _renderer(STRING_TEMPLATE).render_chat(MESSAGES, False) == "<system>Be brief.<user>Hi\nthere"
    assert _renderer(PARTS_TEMPLATE, "string").content_format == "string"


def test_continue_final_message_in_either_format() -> None:
    """The continued assistant turn ends the text, whether its content reached the template as parts or joined."""
    msgs = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "Hello,"}]}]
    kw = {"continue_final_message": True}
    assert _renderer(PARTS_TEMPLATE).render_chat(msgs, False, **kw).endswith("<assistant>[text:Hello,")
    assert _renderer(STRING_TEMPLATE).render_chat(msgs, False, **kw).endswith("<assistant>Hello,")
