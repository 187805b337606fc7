"""onpolicy-quant: on- vs off-policy distillation of a quantized student from its own teacher.

One module per concept: ``assets`` (offline model and data), ``config`` (parameters and
validation), ``data`` (chat datasets), ``models`` (loading), ``quantization`` (torchao QAT/PTQ),
``student`` (build/save/load), ``distill`` (the GKD trainer), ``train`` (one run end to end),
``rundir`` (run-directory safety), ``metrics`` (what a run records), ``plots`` (figures).
"""

__version__ = "0.1.0"
