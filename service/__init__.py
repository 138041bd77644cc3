"""The application layer: HTTP routes, serving, the model registry.

Importing it loads llama.cpp's libraries first, before anything can load the shared libstdc++
(numpy does, and the app imports numpy). A llama.cpp built with libstdc++ linked in statically
(seen with a CUDA build on an H100 machine: no libstdc++.so.6 among its libraries' needs) carries
its own copies, and libstdc++'s GNU-unique symbols (locale facet ids) bind process-wide to the
copy that loaded first. With the shared one first, llama.cpp's model loader mixed the two and
died with SIGSEGV formatting a number in `llama_model::print_info` (issue 10); in that order a
plain `import llama_cpp` script or `llama_cpp.server` never sees it.
"""

import contextlib
import importlib.util

if importlib.util.find_spec("llama_cpp") is not None:
    # A broken install is left to the tier that uses it, which reports the error at load.
    with contextlib.suppress(Exception):
        import llama_cpp  # noqa: F401  (loads libllama and its ggml libraries, then numpy)
