"""The application layer: HTTP routes, serving, the model registry.

Importing it first puts the shared libstdc++ in the process's global symbol scope, before any
engine library loads. A llama.cpp built with libstdc++ linked in statically (seen with a CUDA build
on an H100: no libstdc++.so.6 among its libraries' needs) carries its own copy; once numpy or torch
loads the shared one as well, libstdc++'s GNU-unique symbols (locale facet ids) bind process-wide
to one copy while the rest of llama.cpp's calls use the other, and its model loader died with
SIGSEGV formatting a number in `llama_model::print_info` (issue 10; reproduced with libstdc++ from
GCC 13.3 linked in and GCC 14's shared, in either import order). Loaded globally first, the shared
copy is the one llama.cpp's libstdc++ calls bind to, whatever is imported after.
"""

import contextlib
import ctypes
import os
import sys

if sys.platform == "linux":
    with contextlib.suppress(OSError):  # a libc without libstdc++.so.6 (musl): nothing to share
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
