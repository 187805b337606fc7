"""Known, harmless import notices of torch and torchao, dropped before they reach rendered notebooks.

Both are ``logging`` warnings emitted once per process when torchao is imported (directly, or
by transformers/peft, whichever comes first): the ``torchao`` logger's "Failed to load
.../torchao/_C_*.so" (optional CUDA/MX kernels this build cannot load; nothing here needs them)
and the ``torch.utils._pytree`` logger's "<enum ...> is an Enum subclass and is now natively
supported by torch.compile ... register_constant() ... deprecated" (torchao still registers its
enums that way). A filter on each of those two loggers drops records matching exactly these
messages; every other record, and every ``warnings`` warning, still gets through.
"""

from __future__ import annotations

import logging
import re

KNOWN = {
    "torchao": re.compile(r"Failed to load \S*torchao[/\\]_C\w*\S*\.so\b"),
    "torch.utils._pytree": re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported "
                                      r"by torch\.compile"),
}


class KnownNoticeFilter(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_known_import_notices() -> None:
    """Install the filters (idempotent)."""
    for name, pattern in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownNoticeFilter) for f in logger.filters):
            logger.addFilter(KnownNoticeFilter(pattern))
