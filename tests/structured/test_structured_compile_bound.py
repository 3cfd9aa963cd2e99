"""The compile-time bound: a constraint whose compile outlasts the server's bound is a 400 naming its field, the
server serves on, and the same constraint (compiled meanwhile) is served once the bound allows it. In-process
server around the real engine on SmolLM2, so the bound can be set to zero (every cold compile then exceeds it)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from server_harness import ServerThread

from kubellm.engine.config import EngineConfig
from kubellm.engine.llm_engine import LLMEngine
from kubellm.engine.server.api_server import SERVING_KEY, ServerSettings

SCHEMA = {
    "type": "object",
    "properties": {"bound_probe": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["bound_probe"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(smollm2):
    config = EngineConfig(model=smollm2.path, device="cpu", generation_config="vllm")
    settings = ServerSettings(host="127.0.0.1", port=0, served_model_names=["m"])
    st = ServerThread(lambda: LLMEngine(config, loaded=smollm2), settings).start()
    yield st
    st.stop()


def test_a_compile_over_the_bound_is_a_400_and_the_server_serves_on(server):
    serving = server.server.app[SERVING_KEY]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    kwargs = dict(model="m", messages=[{"role": "user", "content": "A digit as JSON."}], max_tokens=16, temperature=0)
    serving.compile_timeout_s = 0.0
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs, extra_body={"guided_json": SCHEMA})
    assert e.value.body["param"] == "guided_json"
    assert "compiling the constraint took longer than 0 s" in e.value.body["message"]
    assert client.chat.completions.create(**kwargs).choices[0].message.content, "unconstrained requests still run"
    serving.compile_timeout_s = 10.0
    out = client.chat.completions.create(**kwargs, extra_body={"guided_json": SCHEMA}).choices[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.message.content), SCHEMA)
