"""Importing the library prints none of torch/torchao's known import notices (and hides nothing else)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTICES = ("Failed to load", "_C_mxfp8", "is an Enum subclass", "register_constant()")


def test_importing_the_library_prints_no_torchao_notices():
    # metrics imports transformers' Trainer, which imports torchao before quantization does.
    done = subprocess.run([sys.executable, "-c", "import onpolicy_lib.metrics, onpolicy_lib.quantization"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert not [n for n in NOTICES if n in printed], printed


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_known_notices_are_dropped():
    from onpolicy_lib._notices import silence_known_import_notices

    silence_known_import_notices()
    silence_known_import_notices()  # idempotent
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    assert all(len(logger.filters) == 1 for logger in loggers)
    handler = _Records()
    for logger in loggers:
        logger.addHandler(handler)
    known = {"torchao": "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
                        "Could not load this library",
             "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                                    "torch.compile as an opaque value type. Calling register_constant() on Enum "
                                    "subclasses is deprecated and will be an error in a future release."}
    try:
        for logger in loggers:
            logger.warning(known[logger.name])
            logger.warning("some other warning from %s", logger.name)
        assert handler.messages == ["some other warning from torchao", "some other warning from torch.utils._pytree"]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
