"""SamplingParams: defaults, normalisation, validation errors that name the field, generation_config defaults,
and the stop-token set the sampler uses."""

from __future__ import annotations

import pytest

from kubellm.engine.sampling_params import SamplingParams, TokenStop, generation_config_defaults


def _from_generation_config(gen_cfg, **overrides):
    return SamplingParams.from_defaults(generation_config_defaults(gen_cfg), **overrides)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (
        16,
        0,
        [],
        [],
        False,
        None,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.has_penalties and not p.is_greedy


def test_normalisation():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(5, 7), temperature=1, max_tokens=None)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [5, 7]
    assert isinstance(p.temperature, float) and p.max_tokens is None
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_greedy_below_vllms_epsilon():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0, seed=3).is_greedy  # a seed does not make greedy random
    assert SamplingParams(temperature=1e-6).is_greedy  # below vLLM's epsilon
    assert not SamplingParams(temperature=0.7, seed=3).is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0.0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        # wrong types
        ("n", 1.5),
        ("n", True),
        ("temperature", "hot"),
        ("top_k", 2.0),
        ("seed", "42"),
        ("max_tokens", 3.0),
        ("logprobs", True),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop_token_ids", ["1"]),
        ("ignore_eos", "yes"),
    ],
)
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as exc:
        SamplingParams(**{field: value})
    message = str(exc.value)
    assert field in message and repr(value) in message


def test_min_tokens_must_not_exceed_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens=5.*max_tokens=4"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=5, max_tokens=None).min_tokens == 5


@pytest.mark.parametrize(
    "ok",
    [
        {"top_p": 1.0},
        {"top_k": 0},
        {"top_k": 1},
        {"min_p": 1.0},
        {"temperature": 0.0},
        {"presence_penalty": -2.0},
        {"frequency_penalty": 2.0},
        {"repetition_penalty": 0.5},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": 0},
    ],
)
def test_boundary_values_accepted(ok):
    SamplingParams(**ok)


def test_from_generation_config_defaults_and_overrides():
    gen_cfg = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 50,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "max_new_tokens": 256,
        "do_sample": True,  # not a sampling default in vLLM: ignored
        "eos_token_id": [1, 2],
        "bos_token_id": 0,
    }
    p = _from_generation_config(gen_cfg)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.max_tokens) == (
        0.6,
        0.9,
        50,
        0.05,
        1.1,
        256,
    )
    q = _from_generation_config(gen_cfg, temperature=0.0, max_tokens=8, top_k=None, seed=7)
    assert (q.temperature, q.max_tokens, q.top_k, q.seed) == (0.0, 8, 50, 7)  # None = not given
    assert _from_generation_config(None, n=2) == SamplingParams(n=2)
    assert _from_generation_config({"temperature": None}).temperature == 1.0


def test_from_generation_config_validates():
    with pytest.raises(ValueError, match="top_p"):
        _from_generation_config({"top_p": 0.0})
    with pytest.raises(ValueError, match="bogus"):
        _from_generation_config({}, bogus=1)


def test_stop_token_set():
    """The ids the sampler masks until min_tokens: stop_token_ids plus EOS unless ignore_eos."""
    eos = {2}
    assert SamplingParams(stop_token_ids=[7]).all_stop_token_ids(eos) == {2, 7}
    assert SamplingParams(stop_token_ids=[7], ignore_eos=True).all_stop_token_ids(eos) == {7}


def test_token_stop_is_the_engines_stop_rule():
    """What ends a request on a token (the engine loop calls this): EOS unless ignore_eos, then stop_token_ids,
    neither before min_tokens outputs; EOS wins where an id is both (its stop reason is then None)."""
    eos = {2}
    p = SamplingParams(stop_token_ids=[7, 2])
    assert [p.token_stop(t, 1, eos) for t in (2, 7, 3)] == [TokenStop.EOS, TokenStop.STOP_TOKEN, TokenStop.NONE]
    q = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    assert (q.token_stop(2, 5, eos), q.token_stop(7, 5, eos)) == (TokenStop.NONE, TokenStop.STOP_TOKEN)
    r = SamplingParams(min_tokens=3, stop_token_ids=[7])
    assert r.token_stop(2, 2, eos) is TokenStop.NONE and r.token_stop(7, 2, eos) is TokenStop.NONE
    assert r.token_stop(2, 3, eos) is TokenStop.EOS and r.token_stop(7, 3, eos) is TokenStop.STOP_TOKEN


def test_n_is_carried():
    assert SamplingParams(n=4).n == 4
