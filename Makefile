# The two commands: `make demo` (set up, then train on the embedded demo task) and `make test`.
PY := .venv/bin/python
export WANDB_MODE ?= offline

.PHONY: setup demo test clean

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# The family on the embedded demo task, each stage printing held-out rule-following before and after:
# SFT (learns the sentences, not the rule), then from its checkpoint DPO (on the pairs) and PPO (online,
# with the demo's rule reward, at its defaults); replaces runs/demo-* each time.
# A tiny model over-optimises DPO quickly: a larger beta (2.0) stops the push once pairs are separated.
demo: setup
	rm -rf runs/demo-sft runs/demo-dpo runs/demo-ppo
	$(PY) launch.py exp_name=demo-sft n_epochs=3 eval_every=125
	$(PY) launch.py loss=dpo exp_name=demo-dpo model.name_or_path=runs/demo-sft/FINAL lr=3e-5 loss.beta=2.0 \
		n_epochs=2 eval_every=50
	$(PY) launch.py loss=ppo exp_name=demo-ppo model.name_or_path=runs/demo-sft/FINAL

test: setup
	WANDB_MODE=disabled $(PY) -m pytest -q

clean:
	rm -rf .venv runs
