#!/usr/bin/env bash
# Checks of the GPU path (issue 8): SFT then DPO with dtype=auto (bf16 on a GPU), the non-finite
# guard, the float16 refusal, flash-attention without its package, and the run-dir lock, Ctrl-C
# save and resume against a straight run. Run from the repo root with a python3 that has the
# project's dependencies; results in docs/benchmarks.md ("GPU checks").
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
R=/tmp/runs
step() { echo; echo "=== $*"; }
step "1. SFT, dtype auto (bf16 on GPU)"
/usr/bin/time -f "wall %e s" python3 launch.py cache_dir=$R exp_name=sft n_epochs=1 eval_every=50 2>&1 | grep -v Writing | tail -9
step "1b. DPO from it"
/usr/bin/time -f "wall %e s" python3 launch.py cache_dir=$R exp_name=dpo loss=dpo model.name_or_path=$R/sft/FINAL lr=3e-5 loss.beta=2.0 n_examples=1600 eval_every=25 2>&1 | grep -v Writing | tail -11
python3 - <<'PY'
from safetensors.torch import load_file
for run in ("sft", "dpo"):
    w = load_file(f"/tmp/runs/{run}/FINAL/model.safetensors")
    print(run, "FINAL dtypes", sorted({str(v.dtype) for v in w.values()}), "all finite", all(v.float().isfinite().all().item() for v in w.values()))
PY
step "2. NaN guard: SGD lr=1e12"
python3 launch.py cache_dir=$R exp_name=nan optimizer=SGD lr=1e12 n_examples=256 intermediate_checkpoints=true save_every=1 > /tmp/nan.out 2>&1; echo "exit $?"; tail -1 /tmp/nan.out; ls $R/nan
step "3. float16 refused; flash_attention_2 without flash-attn"
python3 launch.py model.dtype=float16; echo "exit $?"
python3 launch.py cache_dir=$R exp_name=fa model.attn_implementation=flash_attention_2 n_examples=64 > /tmp/fa.out 2>&1; echo "exit $?"; tail -1 /tmp/fa.out
step "4. lock, Ctrl-C save, resume == straight"
C="n_examples=64000 intermediate_checkpoints=true save_every=100 eval_every=1000 n_eval_generations=0 optimizer=SGD lr=0.1 lr_schedule=constant warmup=0"
python3 launch.py cache_dir=$R exp_name=straight $C > /tmp/straight.out 2>&1 &
S=$!
python3 launch.py cache_dir=$R exp_name=lock $C > /tmp/lock1.out 2>&1 &
P=$!
for i in $(seq 240); do grep -q '"step": 20,' $R/lock/metrics.jsonl 2>/dev/null && break; sleep 0.5; done
python3 launch.py cache_dir=$R exp_name=lock $C 2>&1 | tail -1; echo "second exit ${PIPESTATUS[0]}"
kill -INT $P; wait $P; echo "first exit $?"; grep -E "interrupted|stopped at" /tmp/lock1.out; ls $R/lock
python3 launch.py cache_dir=$R exp_name=lock $C > /tmp/lock2.out 2>&1; echo "resumed exit $?"; grep -E "resumed from|FINAL:" /tmp/lock2.out
wait $S
python3 - <<'PY'
from safetensors.torch import load_file
a, b = (load_file(f"/tmp/runs/{r}/FINAL/model.safetensors") for r in ("straight", "lock"))
print("resumed vs straight: max abs diff", max((a[k].float() - b[k].float()).abs().max().item() for k in a), "bitwise", all((a[k] == b[k]).all().item() for k in a))
PY
