"""`SamplingParams`: per-request decoding options, named and bounded as vLLM/OpenAI users expect.

Validation happens at construction so a bad request fails alone, before it reaches the scheduler, with an
error that names the offending field and value.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from typing import Any

# Below this temperature sampling is greedy (vLLM uses the same epsilon): dividing by ~0 would overflow.
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs per token

# generation_config.json keys that supply default sampling values (vLLM reads the same ones), → our field names.
GENERATION_CONFIG_KEYS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_config_defaults(gen_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """SamplingParams defaults from a model's generation_config.json: only the keys vLLM honours (temperature,
    top_p, top_k, min_p, repetition_penalty, max_new_tokens -> max_tokens); a key set to None is ignored, so a
    model's config cannot null out a default. The one source of sampling defaults for server and offline use."""
    if gen_cfg is None:
        return {}
    return {name: gen_cfg[key] for key, name in GENERATION_CONFIG_KEYS.items() if gen_cfg.get(key) is not None}


class TokenStop(enum.Enum):
    """How a generated token ends a request (SamplingParams.token_stop)."""

    NONE = "none"
    EOS = "eos"  # finish_reason "stop", stop_reason None
    STOP_TOKEN = "stop_token"  # finish_reason "stop", stop_reason the token id


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"invalid sampling parameter {name}={value!r}: {why}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's `StructuredOutputsParams`): exactly one of a JSON schema, any
    JSON object, a regular expression, a choice of strings, or a grammar (Lark, or GBNF/EBNF as llama.cpp writes
    it). JSON comes out without free whitespace unless `whitespace_pattern` says which blanks may appear (a small
    model may otherwise loop on blanks). `json` accepts a schema as a dict or as JSON text; it is kept as compact
    JSON text in the caller's key order (properties are generated in that order), which also keys the cache of
    compiled grammars."""

    json: str | dict[str, Any] | bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise _bad("structured_outputs", given, "give exactly one of json, regex, choice, grammar or json_object")
        if self.json is not None:
            object.__setattr__(self, "json", _compact_schema(self.json))
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or (name != "whitespace_pattern" and not value)):
                raise _bad(f"structured_outputs.{name}", value, "must be a non-empty string")
        if self.choice is not None:
            ok = isinstance(self.choice, list | tuple) and all(isinstance(c, str) and c for c in self.choice)
            if not ok or not self.choice:
                raise _bad("structured_outputs.choice", self.choice, "must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    @property
    def source(self) -> str:
        """The constraint's text (a choice as a JSON list), without the kind."""
        value = {"json_object": "", "choice": json.dumps(self.choice)}.get(self.kind, getattr(self, self.kind))
        return value if isinstance(value, str) else json.dumps(value)

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What identifies the compiled grammar: kind, source and the JSON whitespace rule."""
        return (self.kind, self.source, self.whitespace_pattern)


def _compact_schema(schema: Any) -> str:
    """A JSON schema (dict, bool, or JSON text) as compact JSON text; a ValueError naming the problem otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _bad("structured_outputs.json", schema[:80], f"is not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(schema, dict | bool):
        raise _bad("structured_outputs.json", schema, "a JSON schema must be an object (or true/false)")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


@dataclass
class SamplingParams:
    """Decoding options of one request; field names and defaults follow vLLM's `SamplingParams`."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off (normalised to 0)
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token; 0: only the sampled token's
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # a JSON schema, regex, choice or grammar

    def __post_init__(self) -> None:
        self._check_types()
        if self.top_k == -1:
            self.top_k = 0
        # Normalise to the list forms the engine and detokenizer consume.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.presence_penalty = float(self.presence_penalty)
        self.frequency_penalty = float(self.frequency_penalty)
        self.repetition_penalty = float(self.repetition_penalty)
        self._check_ranges()

    def _check_types(self) -> None:
        ints = {"n": self.n, "top_k": self.top_k, "min_tokens": self.min_tokens}
        for name, value in ints.items():
            if not _is_int(value):
                raise _bad(name, value, "must be an integer")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                raise _bad(name, value, "must be a number")
        optional_ints = {"seed": self.seed, "max_tokens": self.max_tokens, "logprobs": self.logprobs}
        for name, optional in optional_ints.items():
            if optional is not None and not _is_int(optional):
                raise _bad(name, optional, "must be an integer or None")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be a boolean")
        stop = self.stop
        stop_ok = stop is None or isinstance(stop, str)
        stop_ok = stop_ok or (isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop))
        if not stop_ok:
            raise _bad("stop", stop, "must be a string or a list of strings")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise _bad("structured_outputs", so, "must be a StructuredOutputsParams")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, list | tuple | set) or not all(_is_int(t) for t in ids)):
            raise _bad("stop_token_ids", ids, "must be a list of integers")

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise _bad("n", self.n, "must be at least 1")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise _bad("temperature", self.temperature, "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 0:
            raise _bad("top_k", self.top_k, "must be -1 or 0 (disabled) or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _bad("max_tokens", self.max_tokens, "must be at least 1")
        if self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"must not exceed max_tokens={self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise _bad(name, getattr(self, name), "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise _bad("repetition_penalty", self.repetition_penalty, "must be greater than 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise _bad("logprobs", self.logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        if any(s == "" for s in self.stop or ()):  # normalised to a list by __post_init__
            raise _bad("stop", self.stop, "stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise _bad("stop_token_ids", self.stop_token_ids, "token ids must be non-negative")

    @classmethod
    def from_defaults(cls, defaults: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """`defaults` (a model's, from `generation_config_defaults`), then the caller's explicit values on top;
        an override of None means "not given" (the default applies)."""
        values = dict(defaults)
        known = {f.name for f in fields(cls) if f.init}
        for name, value in overrides.items():
            if name not in known:
                raise ValueError(f"invalid sampling parameter {name}: unknown field")
            if value is not None:
                values[name] = value
        return cls(**values)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def all_stop_token_ids(self, eos_token_ids: Collection[int] = ()) -> set[int]:
        """Token ids that end this request: its stop_token_ids plus the model's EOS ids unless ignore_eos."""
        ids = set(self.stop_token_ids or ())
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return ids

    def token_stop(self, token_id: int, num_output_tokens: int, eos_token_ids: Collection[int] = ()) -> TokenStop:
        """The rule the engine ends a request by on a token: whether `token_id`, just generated as output token
        number `num_output_tokens` (1-based), ends it, and as what. Nothing stops before min_tokens outputs exist
        (the sampler masks these ids until then); EOS wins over a stop_token_id that is also EOS (vLLM's order:
        the stop reason is then None)."""
        if num_output_tokens < self.min_tokens:
            return TokenStop.NONE
        if not self.ignore_eos and token_id in eos_token_ids:
            return TokenStop.EOS
        if token_id in (self.stop_token_ids or ()):
            return TokenStop.STOP_TOKEN
        return TokenStop.NONE
