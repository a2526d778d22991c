#!/usr/bin/env bash
# make demo's two stages on a GPU, with the DPO stage in model.dtype=auto (bf16 weights) and in
# float32: shows what bf16 weights without an fp32 copy cost (docs/benchmarks.md, "GPU checks").
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=/tmp/runs
python3 launch.py cache_dir=$R exp_name=sft n_epochs=3 eval_every=125 model.dtype=float32 2>&1 | grep -A4 "held-out"
for dt in auto float32; do
  echo "=== DPO as in make demo, model.dtype=$dt"
  /usr/bin/time -f "wall %e s" python3 launch.py cache_dir=$R exp_name=dpo-$dt loss=dpo model.name_or_path=$R/sft/FINAL \
    lr=3e-5 loss.beta=2.0 n_epochs=2 eval_every=250 model.dtype=$dt 2>&1 | grep -A10 "held-out"
done
