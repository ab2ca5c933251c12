# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this kind of machine; on a GPU cluster install your CUDA torch into the
# venv first (or set TORCH_SPEC) and it is kept as it is.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Test processes side by side: many tests wait (process start-up, Slurm's scheduler) on one core.
TEST_WORKERS ?= 2

.PHONY: install test test-fast demo bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -e ".[test]"
	@# shellcheck checks the slurm/ scripts in the tests, chromium + its driver open the review sheet
	@# in a real browser; best effort where apt-get is usable (the tests skip with the reason elsewhere).
	@command -v shellcheck >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q shellcheck >/dev/null 2>&1; } || true
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@# tests/test_slurm.py runs a real one-host Slurm cluster: install slurmctld/slurmd/munge if missing
	@bash slurm/local_cluster.sh install || echo "Slurm not installable here: tests/test_slurm.py will skip"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=60 $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: $(STAMP)
	PYTHON=$(PY) bash examples/demo.sh

bench: $(STAMP)
	$(PY) benchmarks/preprocess.py

# On a GPU machine whose python3 has CUDA torch: GPU tests + throughput table (gpu_check.md).
# No venv and no install (such machines often have no network); skips cleanly without a GPU.
_CUDA_OK = -c "import torch; assert torch.cuda.is_available()" 2>/dev/null
GPU_PYTHON ?= $(shell for p in $(PYTHON) $(PY); do $$p $(_CUDA_OK) && echo $$p && exit; done; \
                test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py --output gpu_check.md $(GPU_CHECK_ARGS)

clean:
	rm -rf demo_output .pytest_cache build *.egg-info
