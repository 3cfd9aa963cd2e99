"""Prompt rendering shared by engine and router: chat template + tokenizer -> token ids.

The router has no model files: it fetches `TokenizerInfo` from an engine's /v1/tokenizer_info and builds
the same `PromptRenderer`, so both derive identical token ids and therefore identical block hashes.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.sandbox
from pydantic import BaseModel
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The chat template rejected the conversation (e.g. roles out of order)."""


class TokenizerInfo(BaseModel):
    """What a router needs to render and tokenize exactly as the engine does (GET /v1/tokenizer_info)."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    model_max_length: int | None = None


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class PromptRenderer:
    """Renders chat conversations with a Hugging Face-style Jinja chat template and tokenizes text."""

    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.tokenizer = Tokenizer.from_str(info.tokenizer_json)
        self.bos_token_id = self.tokenizer.token_to_id(info.bos_token) if info.bos_token else None
        self.eos_token_id = self.tokenizer.token_to_id(info.eos_token) if info.eos_token else None

    @cached_property
    def _template(self) -> jinja2.Template | None:
        if not self.info.chat_template:
            return None
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.info.chat_template)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use the completions API")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.info.bos_token or "",
                eos_token=self.info.eos_token or "",
                **kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize text; a BOS is added when the model wants one and the text does not start with it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (
            add_special_tokens
            and self.info.add_bos_token
            and self.bos_token_id is not None
            and not (ids and ids[0] == self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def chat_token_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes the BOS itself where the model wants one.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
