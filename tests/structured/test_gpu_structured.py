"""Structured outputs on a GPU: the Triton bitmask kernel equals the torch path, and the engine (async scheduling,
CUDA graphs, flashinfer) keeps every constrained answer valid. Run by the lead: `pytest -q tests/structured -m gpu`."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from kubellm.engine.token_bitmask import TokenBitmask, apply_token_bitmask, bitmask_words

pytestmark = pytest.mark.gpu


def test_triton_bitmask_kernel_equals_the_torch_path():
    import triton  # noqa: F401  (on a GPU machine a missing Triton is a failure, not a skip)

    from kubellm.engine import token_bitmask

    assert token_bitmask.triton is not None
    vocab = 49152 + 77  # not a multiple of the kernel's block or of 32
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(5, bitmask_words(vocab)), dtype=np.int64).astype(np.int32)
    mask = TokenBitmask([0, 2, 3, 6, 7], words)
    logits = torch.randn(8, vocab)
    expected = logits.clone()
    apply_token_bitmask(expected, mask)  # CPU: the torch ops
    on_gpu = logits.cuda()
    apply_token_bitmask(on_gpu, mask)
    assert torch.equal(on_gpu.cpu(), expected)
    assert torch.isinf(expected[1]).sum() == 0, "rows without a mask are untouched"


def test_engine_on_cuda_keeps_answers_valid_with_async_scheduling_and_graphs(embedded_model_path):
    from kubellm.engine.config import EngineConfig
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams

    engine = LLMEngine(EngineConfig(model=str(embedded_model_path), device="cuda", generation_config="vllm"))
    assert engine.async_scheduling and engine.runner.use_cuda_graphs
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "maximum": 99}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    spec = StructuredOutputsParams(json=schema)
    prompt = engine.renderer.chat_token_ids([{"role": "user", "content": "A person as JSON."}], True)
    for i in range(48):  # constrained and free rows in one batch
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured_outputs=spec if i % 2 else None)
        engine.add_request(f"r{i}", prompt, params)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.runner.graph_replays > 0
    stopped = 0
    for i in range(1, 48, 2):
        c = outs[f"r{i}"].outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            stopped += 1
    assert stopped >= 20
    engine.close()
