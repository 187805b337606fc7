# Two entry points (see README): `make demo` runs the CPU demo, `make test` runs the tests.
# Both set everything up first: the virtual environment, the package, the offline assets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Used only when no torch is importable: on this kind of machine pip resolves it to the
# local CPU wheel. On a GPU box, install into an environment that already has CUDA torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

LLMC_VENV ?= .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed

.PHONY: install kernel assets baselines-env demo test lint

$(STAMP): pyproject.toml constraints.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(MAKE) --no-print-directory kernel
	touch $(STAMP)

# The kernel papermill starts (python3, this environment's): ipykernel warns at every start that its
# local TCP sockets are unencrypted, and papermill cannot ask its kernel manager for keys, so the
# kernel's own log shows errors only (cell output, warnings included, is recorded as before).
kernel:
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	$(BIN)/python -c "import json, pathlib, sys; \
		p = pathlib.Path(sys.prefix, 'share/jupyter/kernels/python3/kernel.json'); k = json.loads(p.read_text()); \
		k['argv'] = [a for a in k['argv'] if not a.startswith('--IPKernelApp.log_level')]; \
		k['argv'].append('--IPKernelApp.log_level=ERROR'); p.write_text(json.dumps(k, indent=1))"

install: $(STAMP)

# llmcompressor (the GPTQ/AWQ baselines) pins transformers/compressed-tensors versions the main
# environment does not use: it gets its own, which the main one calls (onpolicy_lib.calibrated_ptq).
$(LLMC_STAMP): constraints-llmc.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(LLMC_VENV); else $(PYTHON) -m venv $(LLMC_VENV); fi
	$(LLMC_VENV)/bin/python -m pip install -q --upgrade pip
	$(LLMC_VENV)/bin/python -c "import torch" 2>/dev/null || $(LLMC_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LLMC_VENV)/bin/python -m pip install -q -c constraints-llmc.txt llmcompressor==0.14.0.1
	touch $(LLMC_STAMP)

baselines-env: $(LLMC_STAMP)

assets: install
	$(BIN)/python -m onpolicy_lib.assets

demo: assets
	mkdir -p outputs/cpu-demo
	$(BIN)/papermill notebooks/train.ipynb outputs/cpu-demo/train.ipynb -p output_dir outputs/cpu-demo

test: assets baselines-env
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
