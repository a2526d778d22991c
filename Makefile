# The two commands: `make demo` (set up, then train on the embedded demo task) and `make test`.
PY := .venv/bin/python
export WANDB_MODE ?= offline

.PHONY: setup demo test clean

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# Replaces runs/demo each time.
demo: setup
	rm -rf runs/demo
	$(PY) launch.py exp_name=demo n_epochs=3 eval_every=125

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

clean:
	rm -rf .venv runs
