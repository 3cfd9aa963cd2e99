"""Every metric name the stack exports, defined once. Dashboards and tests are checked against these.

Engine metrics use vLLM's names so existing dashboards, KEDA rules and llm-d-style schedulers work
unchanged. These are metric *families*: prometheus-client exposes counters with a `_total` suffix.
"""

# Engine (label: model_name)
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE_PERC = "vllm:kv_cache_usage_perc"  # a 0-1 fraction
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"  # counter, in tokens
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"  # counter, in tokens
NUM_PREEMPTIONS = "vllm:num_preemptions"  # counter
PROMPT_TOKENS = "vllm:prompt_tokens"  # counter
GENERATION_TOKENS = "vllm:generation_tokens"  # counter
REQUEST_SUCCESS = "vllm:request_success"  # counter, label finished_reason
TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"  # histogram
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"  # histogram
E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"  # histogram
REQUEST_QUEUE_TIME = "vllm:request_queue_time_seconds"  # histogram
CACHE_CONFIG_INFO = "vllm:cache_config_info"  # info gauge
# per-request and per-step distributions that vLLM's own dashboards plot
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"  # histogram, per finished request
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"  # histogram, per finished request
REQUEST_PREFILL_TIME = "vllm:request_prefill_time_seconds"  # histogram: first scheduled -> first token
REQUEST_DECODE_TIME = "vllm:request_decode_time_seconds"  # histogram: first token -> last token
REQUEST_INFERENCE_TIME = "vllm:request_inference_time_seconds"  # histogram: first scheduled -> last token
ITERATION_TOKENS = "vllm:iteration_tokens_total"  # histogram (the _total is part of vLLM's name), per engine step
REQUEST_PARAMS_N = "vllm:request_params_n"  # histogram of the n sampling parameter
# kubellm additions beside vLLM's names (block counts let tests and the soak check for leaks exactly)
KV_CACHE_BLOCKS_USED = "kubellm:kv_cache_blocks_used"
KV_CACHE_BLOCKS_TOTAL = "kubellm:kv_cache_blocks_total"
STRUCTURED_OUTPUT_COMPILE_TIME = "kubellm:structured_output_compile_seconds"  # histogram: grammar compiles
STRUCTURED_OUTPUT_REQUESTS = "kubellm:structured_output_requests"  # counter, label kind (json, regex, ...)

ENGINE_METRICS = [
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    KV_CACHE_USAGE_PERC,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    NUM_PREEMPTIONS,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_SUCCESS,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    E2E_REQUEST_LATENCY,
    REQUEST_QUEUE_TIME,
    CACHE_CONFIG_INFO,
    REQUEST_PROMPT_TOKENS,
    REQUEST_GENERATION_TOKENS,
    REQUEST_PREFILL_TIME,
    REQUEST_DECODE_TIME,
    REQUEST_INFERENCE_TIME,
    ITERATION_TOKENS,
    REQUEST_PARAMS_N,
    KV_CACHE_BLOCKS_USED,
    KV_CACHE_BLOCKS_TOTAL,
    STRUCTURED_OUTPUT_COMPILE_TIME,
    STRUCTURED_OUTPUT_REQUESTS,
]

# Router (prefix kubellm_router_)
ROUTER_REQUESTS = "kubellm_router_requests"  # counter {model, backend, code}
ROUTER_REQUEST_DURATION = "kubellm_router_request_duration_seconds"  # histogram {model}
ROUTER_TTFT = "kubellm_router_time_to_first_byte_seconds"  # histogram {model}
ROUTER_IN_FLIGHT = "kubellm_router_in_flight_requests"  # gauge {backend}
ROUTER_QUEUED = "kubellm_router_queued_requests"  # gauge {model}: the operator scales from zero on it
ROUTER_ROUTING_DECISIONS = "kubellm_router_routing_decisions"  # counter {policy, reason}
ROUTER_PREFIX_MATCH_RATIO = "kubellm_router_prefix_match_ratio"  # histogram
ROUTER_RETRIES = "kubellm_router_retries"  # counter {model}
ROUTER_BACKEND_HEALTHY = "kubellm_router_backend_healthy"  # gauge {backend}
ROUTER_DISCOVERY_EVENTS = "kubellm_router_discovery_events"  # counter {kind}
# the seq of the last KV event the router applied per replica (-1: no live stream); an engine's own is the seq of
# its /v1/kv_events snapshot, so the difference is how far behind the router's view of that cache is
ROUTER_KV_EVENT_SEQ = "kubellm_router_kv_event_seq"  # gauge {backend}

# Operator (prefix kubellm_operator_)
OPERATOR_DESIRED_REPLICAS = "kubellm_operator_desired_replicas"  # gauge {namespace, name}
OPERATOR_READY_REPLICAS = "kubellm_operator_ready_replicas"  # gauge {namespace, name}
OPERATOR_SCALING_DECISIONS = "kubellm_operator_scaling_decisions"  # counter {namespace, name, reason}
OPERATOR_RECONCILE_ERRORS = "kubellm_operator_reconcile_errors"  # counter {namespace, name}
OPERATOR_RECONCILE_DURATION = "kubellm_operator_reconcile_duration_seconds"  # histogram
