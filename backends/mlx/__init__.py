"""The MLX generation engine (mlx-lm): fast on Apple Silicon, correct (and slow) on Linux CPU.

Beyond plain generation it keeps a small prefix cache of KV states, so a multi-turn chat, which
re-sends the whole history, only runs the new tokens through the model; it enforces
`response_format` with llguidance, which masks the logits to tokens the JSON grammar allows; and
it decodes concurrent requests together with mlx-lm's `BatchGenerator` (continuous batching), with
the prefix cache, the grammar, sampling options and seeds all working per sequence in the batch.

- `backend`: `MlxBackend`, the public engine (load, tokenize, chat templates, one request's decode);
- `batch`: continuous batching, and the `ModelHandle` both decode paths work from;
- `sampling`: samplers, logits processors (penalties, the grammar mask, thinking budgets), logprobs;
- `prefix_cache`: KV states of recent sequences, reused by longest common prefix; those it lets go
  go to the prompt cache tiers (`backends.prompt_cache`: RAM, disk) and come back from there;
- `cache_state`: an mlx-lm cache as a value those tiers hold, and its disk encoding;
- `adapters`: LoRA adapters, each on a copy of the modules that shares the base weights.

Nothing is imported here, so importing one module does not load the others.
"""
