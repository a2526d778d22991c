# The two commands: `make demo` (set up, then train on the embedded demo task) and `make test`.
PY := .venv/bin/python
export WANDB_MODE ?= offline

.PHONY: setup demo test clean

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# SFT, then DPO from the SFT checkpoint, on the embedded demo task; replaces runs/demo-* each time.
# A tiny model over-optimises DPO quickly: a larger beta (2.0) stops the push once pairs are separated.
demo: setup
	rm -rf runs/demo-sft runs/demo-dpo
	$(PY) launch.py exp_name=demo-sft n_epochs=3 eval_every=125
	$(PY) launch.py loss=dpo exp_name=demo-dpo model.name_or_path=runs/demo-sft/FINAL lr=3e-5 loss.beta=2.0 \
		n_epochs=2 eval_every=50

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

clean:
	rm -rf .venv runs
