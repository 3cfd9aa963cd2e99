"""Across the engine/router boundary: for every shape of chat request, the router's prefix-hash input equals the
prompt token ids the real engine server computed (returned with vLLM's `return_token_ids`), and the router's
block hashes are the very hashes the engine announces for that prompt on GET /v1/kv_events.

Two models: the embedded SmolLM2 (its real tokenizer and chat template; `--device sim`, since the prompt path and
the KV events do not depend on the forward pass) and a tiny random Qwen3 checkpoint run for real on the CPU, with
a byte-level BPE tokenizer and a Qwen-style chat template with tool-call history built here. On the Qwen3 model
transformers' own `apply_chat_template` is the reference the engine's ids must also equal.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from server_harness import ServerThread

from kubellm.block_hash import hash_blocks, to_hex
from kubellm.engine.config import EngineConfig
from kubellm.engine.server.api_server import ServerSettings
from kubellm.engine.server.chat_tools import ChatParsingConfig
from kubellm.kv_events import BlockRemovedEvent, BlockStoredEvent, SnapshotEvent, decode_event
from kubellm.router.app import Router
from kubellm.router.config import RouterConfig
from kubellm.router.request_body import parse_routed_body
from kubellm.routing import RoutingPolicy

MODEL = "boundary-model"

# A Qwen-style template of our own: the tools as JSON, system/developer first, `name`, assistant reasoning and tool
# calls (arguments through `tojson`, so they must reach the template as objects), tool results, and an
# `enable_thinking` switch.
QWEN_STYLE_TEMPLATE = """\
{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- if messages[0].role in ['system', 'developer'] %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}
{%- for m in rest %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.tool_call_id }}
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}
{%- for call in m.tool_calls or [] %}
<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}{{ ' (' + m.name + ')' if m.name else '' }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"]

SYSTEM = "You are a careful assistant for a weather service. Answer briefly and cite the tool you used. " * 3
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALL_PARSED = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
LONG = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(300))


@dataclass
class Shape:
    """One request shape: the wire body's chat fields, and the conversation as chat templates must see it (the
    reference transformers renders), with the template options."""

    name: str
    body: dict[str, Any]
    template_messages: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)


def _shapes() -> list[Shape]:
    system = {"role": "system", "content": SYSTEM}
    user = {"role": "user", "content": "What is the weather in Paris today, and should I take an umbrella?"}
    partial = {"role": "assistant", "content": "The weather in Paris is"}
    tool_history = [
        system,
        user,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "rain": false}'},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]
    tool_history_seen = [*tool_history[:2], {"role": "assistant", "content": "", "tool_calls": [CALL_PARSED]}]
    tool_history_seen += tool_history[3:]
    parts = [{"type": "text", "text": "First part of the question about Paris."}, {"type": "text", "text": "Second."}]
    joined = {"role": "user", "content": "First part of the question about Paris.\nSecond."}
    developer = {"role": "developer", "content": SYSTEM}
    named = {**user, "name": "alice"}
    no_gen = {"add_generation_prompt": False}
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    long = {"role": "user", "content": LONG}
    return [
        Shape("system+user", {"messages": [system, user]}, [system, user]),
        Shape("developer+named-user", {"messages": [developer, named]}, [developer, named]),
        Shape("content-parts", {"messages": [system, {"role": "user", "content": parts}]}, [system, joined]),
        Shape("tool-call-history", {"messages": tool_history}, tool_history_seen),
        Shape("no-generation-prompt", {"messages": [system, user], **no_gen}, [system, user], no_gen),
        Shape("continue-final-message", {"messages": [system, user, partial], **cont}, [system, user, partial], cont),
        Shape(
            "chat-template-kwargs",
            {"messages": [system, user], "chat_template_kwargs": {"enable_thinking": False}},
            [system, user],
            {"enable_thinking": False},
        ),
        Shape("cache-salt", {"messages": [system, user], "cache_salt": "tenant-a"}, [system, user]),
        Shape("tools", {"messages": [system, user], "tools": TOOLS}, [system, user], {"tools": TOOLS}),
        Shape(
            "tools+tool-results",
            {"messages": tool_history, "tools": TOOLS, "tool_choice": "none"},
            tool_history_seen,
            {"tools": TOOLS},
        ),
        Shape("long-prompt", {"messages": [system, long]}, [system, long]),
    ]


SHAPES = _shapes()


def _save_tiny_qwen3(path: Path) -> Path:
    """Random Qwen3 weights, a byte-level BPE tokenizer trained on the shapes' own text, the template above."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(s.body) for s in SHAPES] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    config = Qwen3Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_STYLE_TEMPLATE
    fast.save_pretrained(path)
    return path


class EngineEvents:
    """The engine's cached block hashes, as its own GET /v1/kv_events stream announces them."""

    def __init__(self) -> None:
        self.cached: set[str] = set()
        self.block_size = 0
        self.snapshot = asyncio.Event()

    async def follow(self, session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "/v1/kv_events", timeout=aiohttp.ClientTimeout(total=None)) as r:
            assert r.status == 200
            async for line in _lines(r.content):
                ev = decode_event(line)
                if isinstance(ev, SnapshotEvent):
                    self.cached, self.block_size = set(ev.hashes), ev.block_size
                    self.snapshot.set()
                elif isinstance(ev, BlockStoredEvent):
                    self.cached.update(ev.hashes)
                elif isinstance(ev, BlockRemovedEvent):
                    self.cached.difference_update(ev.hashes)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    async for line in content:
        if line.strip():
            yield line


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module", params=["smollm2-sim", "qwen3-cpu"])
def boundary_engine(request, tmp_path_factory):
    if request.param == "smollm2-sim":
        config = EngineConfig(device="sim", block_size=32, num_gpu_blocks_override=1024, sim_time_scale=0.01)
        reference = None
    else:
        path = _save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))
        config = EngineConfig(model=str(path), device="cpu", block_size=16, num_gpu_blocks_override=512)
        from transformers import AutoTokenizer

        reference = AutoTokenizer.from_pretrained(path)
    from kubellm.engine.llm_engine import LLMEngine

    parsing = ChatParsingConfig(tool_call_parser="hermes", enable_auto_tool_choice=True)
    settings = ServerSettings(host="127.0.0.1", port=0, served_model_names=[MODEL], chat_parsing=parsing)
    st = ServerThread(lambda: LLMEngine(config), settings).start()
    yield st, config, reference
    st.stop()


async def test_router_hashes_equal_engine_prompt_ids_and_kv_events(boundary_engine):
    server, config, reference = boundary_engine
    router = Router(RouterConfig(backends=[server.url], models=[MODEL], policy=RoutingPolicy.PREFIX))
    events = EngineEvents()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    async with aiohttp.ClientSession() as session:
        follower = asyncio.ensure_future(events.follow(session, server.url))
        await router.start()
        try:
            await asyncio.wait_for(events.snapshot.wait(), 30)
            assert events.block_size == config.block_size
            renderer = await router.hasher.renderer(MODEL)
            assert renderer is not None, "the router could not load the engine's tokenizer"
            await _until(lambda: router.hasher.block_sizes.get(MODEL) == config.block_size, 30, "the router's snapshot")
            (backend,) = router.registry.backends.values()
            for shape in SHAPES:
                await _check_shape(shape, router, backend.slot, client, events, config.block_size, reference)
        finally:
            follower.cancel()
            await router.stop()
            await client.close()


async def _check_shape(
    shape: Shape, router: Router, slot: int, client: openai.AsyncOpenAI, events: EngineEvents, bs: int, reference: Any
) -> None:
    body = {"model": MODEL, **shape.body}
    routed = parse_routed_body(json.dumps(body).encode()).fields  # what the router hashes, as its handler reads it
    key = await router.hasher.key(MODEL, "chat", routed)
    router_ids = await router.hasher.token_ids(MODEL, "chat", routed)

    vllm_fields = {k: v for k, v in shape.body.items() if k != "messages"}  # not in the openai client's signature
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=shape.body["messages"],
        max_tokens=1,
        temperature=0,
        extra_body={**vllm_fields, "return_token_ids": True},
    )
    engine_ids = resp.model_extra["prompt_token_ids"]
    assert resp.usage.prompt_tokens == len(engine_ids), shape.name
    assert router_ids == engine_ids, shape.name
    if reference is not None:
        options = {"add_generation_prompt": True, **shape.options}
        text = reference.apply_chat_template(shape.template_messages, tokenize=False, **options)
        assert engine_ids == reference.encode(text, add_special_tokens=False), shape.name

    assert key.exact and key.block_tokens == bs, shape.name
    assert len(key.hashes) == len(engine_ids) // bs > 0, shape.name
    assert key.hashes == hash_blocks(engine_ids, bs, shape.body.get("cache_salt", "")), shape.name
    wanted = [to_hex(h) for h in key.hashes]
    await _until(lambda: events.cached.issuperset(wanted), 30, f"{shape.name}'s blocks in the engine's KV events")

    def routed_blocks_known() -> bool:
        return router.index.match(slot, key.hashes) == len(key.hashes)

    await _until(routed_blocks_known, 30, f"{shape.name}'s blocks in the router's index (from the same events)")
