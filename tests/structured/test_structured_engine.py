"""Structured outputs through the engine on the embedded SmolLM2 (CPU): every answer obeys its constraint with
n > 1, logprobs and seeds; async scheduling, chunked prefill and preemption give what plain synchronous steps
give; a constraint that admits the unconstrained greedy answer leaves it unchanged."""

from __future__ import annotations

import json
import re
import sys
import threading

import jsonschema
import numpy as np
import pytest

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.outputs import OutputAssembler
from kubellm.engine.sampling_params import SamplingParams, StructuredOutputsParams
from kubellm.engine.token_bitmask import bitmask_words

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def make_engine(smollm2, **overrides) -> LLMEngine:
    cfg = EngineConfig(model=smollm2.path, device="cpu", generation_config="vllm", **overrides)
    return LLMEngine(cfg, loaded=smollm2)


def chat_ids(engine: LLMEngine, text: str) -> list[int]:
    return engine.renderer.chat_token_ids([{"role": "user", "content": text}], True)


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]):
    ids = [engine.add_request(f"r{i}", p, params) for i, (p, params) in enumerate(requests)]
    final = {}
    whole = OutputAssembler()
    while engine.has_unfinished_requests():
        for out in map(whole.add, engine.step()):
            if out.finished:
                final[out.request_id] = out
    assert engine.kv.num_used_blocks == 0
    return [final[i] for i in ids]


class _HostBuffers:
    """PinnedBitmaskBuffers' two buffers taken in turn, in host memory (the CPU has no pinned tensors); the "pinned
    tensor" handed back is the array itself. Records which threads took a buffer."""

    def __init__(self, unused, words: int):
        assert unused is None, "the CPU engine makes no pinned buffers"
        self._buffers = [np.zeros((0, words), np.int32), np.zeros((0, words), np.int32)]
        self._next, self.words, self.takers = 0, words, set()

    def take(self, rows: int):
        self.takers.add(threading.current_thread().name.split("_")[0])
        slot, self._next = self._next, 1 - self._next
        if self._buffers[slot].shape[0] < rows:
            self._buffers[slot] = np.zeros((rows, self.words), np.int32)
        view = self._buffers[slot][:rows]
        view[:] = 0x5A5A5A5A  # whatever a step before left: every row must be written whole
        return view, view


def summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def engine(smollm2):
    return make_engine(smollm2)


def test_json_schema_with_n_seed_and_logprobs(engine):
    spec = StructuredOutputsParams(json=PERSON)
    prompt = chat_ids(engine, "Describe a person as JSON with a name, an age and tags.")
    params = SamplingParams(temperature=1.0, seed=7, n=3, logprobs=2, max_tokens=60, structured_outputs=spec)
    (out,) = run(engine, [(prompt, params)])
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        assert len(c.logprobs) == len(c.token_ids)
        for tid, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert entry[tid].logprob > -1e9, "the sampled token is one the constraint allows"
    assert len({c.text for c in out.outputs}) > 1, "n samples differ"


def test_regex_choice_and_grammar_on_completions(engine):
    prompt = engine.renderer.encode("Q: What is the capital of France?\nA:")
    reqs = [
        (prompt, SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(
            regex=r" [A-Z][a-z]+\."))),
        (prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=20, structured_outputs=StructuredOutputsParams(
            choice=["Paris", "London", "Rome"]))),
        (prompt, SamplingParams(temperature=0.8, seed=2, max_tokens=20, structured_outputs=StructuredOutputsParams(
            grammar='start: " " city "!"\ncity: "Paris" | "Lyon"'))),
    ]  # fmt: skip
    regex, choice, grammar = (o.outputs[0] for o in run(engine, reqs))
    assert re.fullmatch(r" [A-Z][a-z]+\.", regex.text) and regex.finish_reason == "stop"
    assert choice.text in ("Paris", "London", "Rome") and choice.finish_reason == "stop"
    assert grammar.text in (" Paris!", " Lyon!") and grammar.finish_reason == "stop"


def test_cut_by_max_tokens_ends_with_length(engine):
    spec = StructuredOutputsParams(regex=r"[a-z]{40}")
    (out,) = run(engine, [(engine.renderer.encode("Letters:"), SamplingParams(temperature=0.0, max_tokens=3,
                                                                                structured_outputs=spec))])  # fmt: skip
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3


def test_an_admitting_constraint_leaves_greedy_output_unchanged(engine):
    prompts = [chat_ids(engine, q) for q in ("What is the capital of France?", "Name three colours.")]
    free = run(engine, [(p, SamplingParams(temperature=0.0, max_tokens=12)) for p in prompts])
    anything = StructuredOutputsParams(regex=r"(.|\n)*")
    constrained = run(
        engine, [(p, SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=anything)) for p in prompts]
    )
    assert summary(constrained) == summary(free)
    assert "Paris" in free[0].outputs[0].text


def test_async_scheduling_chunked_prefill_and_preemption_equal_synchronous(smollm2):
    spec = StructuredOutputsParams(json=PERSON)
    base = make_engine(smollm2)
    reqs = []
    for i in range(4):
        prompt = chat_ids(base, f"Person number {i} as JSON, please.")
        params = SamplingParams(temperature=0.9, seed=i, max_tokens=32, structured_outputs=spec if i % 3 else None)
        reqs.append((prompt, params))
    reference = summary(run(base, reqs))
    stressed = make_engine(
        smollm2,
        async_scheduling=True,
        max_num_batched_tokens=32,  # prompts of ~40 tokens prefill in chunks
        num_gpu_blocks_override=9,
        kv_growth_reserve_tokens=0,
    )
    assert stressed.async_scheduling
    assert summary(run(stressed, reqs)) == reference
    assert stressed.scheduler.num_preemptions > 0, "the pool is small enough to preempt"
    for (_, params), out in zip(reqs, reference, strict=True):
        text, reason = out[0][1], out[0][2]
        if params.structured_outputs is not None and reason == "stop":
            jsonschema.validate(json.loads(text), PERSON)
    assert any(
        p.structured_outputs is not None and o[0][2] == "stop" for (_, p), o in zip(reqs, reference, strict=True)
    )


def test_grammar_prefetch_fills_the_masks_ahead_and_changes_no_answer(smollm2):
    """Async scheduling with the prefetcher (KUBELLM_GRAMMAR_PREFETCH=1; off by default) and without it give the same
    tokens, with the grammars advanced one row at a time or in one call (KUBELLM_GRAMMAR_BATCH_ACCEPT=1); with the
    prefetcher, the masks of running constrained rows come filled ahead."""
    spec = StructuredOutputsParams(json=PERSON)
    reqs = []
    for i in range(5):
        params = SamplingParams(
            temperature=0.0 if i == 0 else 0.8, seed=i, max_tokens=24, n=2 if i == 3 else 1,
            structured_outputs=spec if i != 2 else None,
        )  # fmt: skip
        reqs.append((params, f"Person number {i} as JSON, please."))
    results = {}
    python_interval = sys.getswitchinterval()
    # (prefetch, KUBELLM_GRAMMAR_BATCH_ACCEPT, KUBELLM_GRAMMAR_STEP_REUSE): the accepts one row at a time or in one
    # call, on either thread; with the prefetcher, a step whose rows are the last one's reusing its plan and taking
    # its masks whole, or (off) every step rebuilding its rows and copying its masks row by row, as before
    # The last mode adds KUBELLM_GRAMMAR_DIRECT_MASKS over host buffers taken in turn as the pinned ones are on CUDA.
    for prefetch, batched, reuse, direct in (
        (True, False, True, False), (False, False, True, False), (True, True, True, False),
        (False, True, True, False), (True, True, False, False), (True, True, True, True),
    ):  # fmt: skip
        eng = make_engine(
            smollm2, async_scheduling=True, grammar_prefetch=prefetch, grammar_batch_accept=batched,
            grammar_step_reuse=reuse, grammar_direct_masks=direct,
        )  # fmt: skip
        buffers = _HostBuffers(eng._mask_buffers, bitmask_words(eng.model_config.vocab_size)) if direct else None
        eng._mask_buffers = buffers
        requests = [(chat_ids(eng, text), params) for params, text in reqs]
        results[prefetch, batched, reuse, direct] = summary(run(eng, requests))
        stats = eng.structured_outputs.fill_stats
        if buffers is not None:  # the worker filled them: the steps that took its masks whole copied nothing
            assert "kubellm-grammar" in buffers.takers and stats.whole_steps > 0
        assert (stats.batched_accepts > 0) is batched
        assert (stats.whole_steps > 0 and stats.reused_plans > 0 and stats.steady_steps > 0) is (prefetch and reuse)
        if prefetch:
            # rows counts every fill, the worker's included; only each request's first mask is filled on the spot
            assert stats.prefetched_rows > stats.rows / 2, "most rows' masks came from the prefetcher"
            assert stats.worker_steps > 0 and stats.worker_fill_seconds > 0
            # KUBELLM_GRAMMAR_SWITCH_INTERVAL_MS (0.5 by default) while the prefetcher runs, Python's again after
            assert sys.getswitchinterval() == pytest.approx(0.0005)
        else:
            assert stats.prefetched_rows == 0 and stats.worker_steps == 0
        eng.close()
        assert sys.getswitchinterval() == python_interval
    for mode, result in results.items():  # the same tokens, texts and endings in every mode
        assert result == results[False, False, True, False], mode
    for (params, _), out in zip(reqs, results[True, False, True, False], strict=True):
        for _tokens, text, reason in out:
            if params.structured_outputs is not None and reason == "stop":
                jsonschema.validate(json.loads(text), PERSON)


def test_an_invalid_constraint_is_refused_before_queueing(engine):
    with pytest.raises(ValueError, match="invalid regex"):
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    assert not engine.has_unfinished_requests()
