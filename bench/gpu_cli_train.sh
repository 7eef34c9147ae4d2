# One device call: `tuneship train` (the real CLI, GPU defaults: fused 4-bit+LoRA layers, per-layer compile)
# on variable-length demo rows, with eval and checkpoints in the middle: dynamic shapes, no-grad eval, saving.
# Needs, in the working tree: .whl/ (the wheels the GPU host lacks, see shared/ENVIRONMENT.md) and .distbench/
# (`python bench/train_distributed.py prepare`: the tokenizer beside the random model). Run from the repo root:
#     bash bench/gpu_cli_train.sh      # with $OUT set to a folder for the logs
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ls /tmp/m/config.json 2>/dev/null || python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import train_distributed as t; t.build_model(Path('/tmp/m'), False)" || exit 1
python3 -m tuneship.cli data demo --out /tmp/d --overwrite --json > /dev/null || exit 1
TORCH_LOGS=recompiles python3 -m tuneship.cli train --config configs/demo.yaml --set base_model=/tmp/m \
  --set data.train=/tmp/d/train.jsonl --set data.valid=/tmp/d/valid.jsonl --set data.system_prompt_file=/tmp/d/system_prompt.txt --set max_steps=40 \
  --set eval_steps=20 --set save_steps=20 --set logging_steps=5 --out /tmp/o$$ --json > $OUT/train.json 2> $OUT/train.err
rc=$?
grep -c "Recompiling" $OUT/train.err | sed 's/^/recompiles: /'
grep -h "speed:\|Recompiling\|triggered by" $OUT/train.err | sort | uniq -c | sort -rn | head -20
ls -d /tmp/o*/checkpoint-* /tmp/o*/adapter_model.safetensors 2>/dev/null | head -20
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
try:
    s = json.load(open(f"{out}/train.json"))
    print({k: s.get(k) for k in ("status", "steps", "final_loss", "eval_loss", "tokens_per_s", "peak_mem_gib", "wall_s", "device")})
    import glob; h = json.load(open(glob.glob("/tmp/o*/log_history.json")[0]))
    print([(x.get("step"), x.get("loss"), x.get("eval_loss")) for x in h if "loss" in x or "eval_loss" in x])
except Exception as e:
    print("no summary:", e)
PY
tail -c 1500 $OUT/train.err
exit $rc
