"""`python -m service` loads llama.cpp's libraries before anything loads the shared libstdc++.

A llama.cpp built with libstdc++ linked in statically died with SIGSEGV in its model loader when
numpy had loaded the shared libstdc++ first (issue 10, CUDA build on an H100; service/__init__.py
says why). The dynamic loader's own log tells which library first needed libstdc++.so.6.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's loader log (LD_DEBUG)")
def test_llama_cpp_loads_before_the_shared_libstdcxx(tmp_path: Path) -> None:
    log = tmp_path / "ld"
    env = {**os.environ, "LD_DEBUG": "files", "LD_DEBUG_OUTPUT": str(log)}
    subprocess.run([sys.executable, "-c", "import service.__main__"], env=env, check=True, timeout=120)
    lines = [ln for f in tmp_path.glob("ld.*") for ln in f.read_text().splitlines() if "file=libstdc++.so.6" in ln]
    assert lines, "no library of the service's process needed libstdc++.so.6"
    first_needer = lines[0].split("needed by", 1)[1].strip().split()[0]
    assert Path(first_needer).resolve().parent == (Path(llama_cpp.__file__).parent / "lib").resolve(), lines[0]
