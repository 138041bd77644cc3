"""llama.cpp engine: GGUF models on Metal, CUDA or plain CPUs, driven through llama.cpp's C API.

llama-cpp-python is the dependency, but only for its ctypes bindings: the model, the context, the
batch, the samplers and the KV cache are llama.cpp's own objects (`llama_decode`,
`llama_sampler_*`, `llama_memory_seq_*`), so per-token work in Python is a handful of calls.

- `backend`: `LlamaCppBackend`, the public engine (load, tokenize, chat templates, decode);
- `batch`: continuous batching, the decode step (one request alone, `MAX_BATCH=1`, runs it too);
- `sampling`: each sequence's native sampler chain, grammars, logprobs;
- `kv_slots`: the KV cache's sequence ids and the prompt prefixes they keep for reuse;
- `adapters`: LoRA adapters, read from GGUF and set on the context;
- `users`: the threads besides the worker inside the native model, which `close` waits for.

Nothing is imported here, so `import backends.llamacpp.adapters` does not load the backend.
"""
