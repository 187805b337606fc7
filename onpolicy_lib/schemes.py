"""The student's weight-only quantization schemes by name.

A module of its own, free of torch and torchao, so that validating a configuration (``config``) and
quantizing (``quantization``) read the same names without the first importing the second.
"""

QUANT_TYPES: tuple[str, ...] = ("int4", "int8", "int3", "int2")
