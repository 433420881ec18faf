# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (once) and install segpipe into it.
#
# torch: TORCH defaults to the CPU build pinned here. For a GPU machine, install a CUDA build of
# torch into .venv first (see README): the torch found is a constraint of the install, so no
# extra (MONAI 1.6 asks for torch>=2.8) replaces it. TORCH is not read once .venv has a torch.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segpipe-installed

.PHONY: demo test bench bench-models bench-throughput weights aerial-weights clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -c "import torch; print(f'torch=={torch.__version__}')" > $(VENV)/torch.txt
	$(BIN)/python -m pip install --quiet -e ".[dev]" --constraint $(VENV)/torch.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/segpipe demo $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy segpipe
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/memory.py $(ARGS)

bench-models: $(STAMP)
	$(BIN)/python benchmarks/models.py $(ARGS)

# Never in CI: minutes of wall time, numbers that depend on the machine.
bench-throughput: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py $(ARGS)

weights: $(STAMP)
	$(BIN)/python scripts/train_tissue_unet.py

aerial-weights: $(STAMP)
	$(BIN)/python scripts/train_aerial_unet.py

clean:
	rm -rf $(VENV) segpipe-demo .pytest_cache .hypothesis
