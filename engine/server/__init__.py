"""`kubellm serve`: the OpenAI-compatible HTTP server around one LLMEngine (aiohttp, one engine thread)."""
