# Two commands set everything up and run (README):
#   make demo   -> .venv, then pretrain and fine-tune on the embedded default data (CPU, minutes)
#   make test   -> .venv, software Vulkan for the simulators, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned, so nothing else pulls a multi-GB CUDA build on CPU machines.
TORCH  ?= torch==2.13.0
EXTRAS ?= rt1,maniskill,diffusers,text,dev

.PHONY: demo test install render lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Mesa's software Vulkan (lavapipe) so SAPIEN / ManiSkill3 render without a GPU: the one command that
# downloads (apt, no root) and compiles (the SAPIEN 2.2 layer); the library itself never does. Then a check
# that a renderer starts. Cache: WORLDMODEL_CPU_RENDER_DIR or ~/.cache/worldmodel/cpu-render.
render: install
	$(PY) -m envs.cpu_render setup
	$(PY) -m envs.cpu_render check

demo: install
	$(PY) scripts/pretrain.py
	$(PY) scripts/finetune_rt1.py

test: install render
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/bench_backbone.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
