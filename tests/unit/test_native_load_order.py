"""Importing `service` makes the shared libstdc++ global before any engine library loads.

A llama.cpp built with libstdc++ linked in statically died with SIGSEGV in its model loader once
numpy or torch had loaded the shared libstdc++ too (issue 10; service/__init__.py says why). With
the shared copy in the global scope first, llama.cpp's libstdc++ calls bind to it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import service
assert "numpy" not in sys.modules and "llama_cpp" not in sys.modules, "service must come before them"
ctypes.CDLL(None)["_ZNSt6locale7classicEv"]  # std::locale::classic(), found in the global scope
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's libstdc++.so.6")
def test_service_makes_the_shared_libstdcxx_global_first() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
