"""A test's function run under Triton's interpreter, which runs Triton kernels on CPU tensors, in a Python process of
its own: Triton interprets its library functions only if TRITON_INTERPRET is set before Triton is first imported,
which other tests of this process (anything that compiles) may already have done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def interpreted_lines(function: str) -> list[str]:
    """The lines that ``function`` (a dotted path such as ``tests.test_row_norm.interpreted_differences``, taking no
    arguments and returning a list of str) returns when run with TRITON_INTERPRET=1; asserts that the process ran."""
    module, name = function.rsplit(".", 1)
    code = f"from {module} import {name} as lines; print('\\n'.join(lines()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")[:-1]
