"""What a lab user sees on the terminal: TensorFlow's start-up notices are dropped, every other line of
stderr (a real error included) passes through as it is written."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, sys
from hema_pipeline.cli import _tensorflow_startup_notices_filtered
with _tensorflow_startup_notices_filtered():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1796633900.413829 10994 cudart_stub.cc:31] Could not find cuda drivers on your machine\n")
    os.write(2, b"E0000 00:00:1796633915.494296 10994 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
    os.write(2, b"F0000 something fatal the user must see\n")
    print("a Python warning the user must see", file=sys.stderr, flush=True)
print("after the block", file=sys.stderr)
"""


def test_start_up_notices_are_dropped_and_everything_else_passes():
    completed = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    lines = completed.stderr.splitlines()
    assert lines == ["F0000 something fatal the user must see", "a Python warning the user must see", "after the block"]
