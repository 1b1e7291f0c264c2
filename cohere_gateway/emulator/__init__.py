"""A local stand-in for api.cohere.ai: Cohere's wire formats, deterministic usage, injectable faults.

`server` is the HTTP edge (aiohttp); `chat`, `compat`, `generate`, `embed`, `rerank`, `classify`,
`tokenizer` and `catalog` build the responses (pure); `tokens` holds the usage formula tests rely on;
`faults` parses the `X-Emulator-Fault` header; `recorder` keeps the request log of `/__emulator/requests`.
"""
