#!/usr/bin/env bash
# A further stage of the shipped SAT artifact on a lent GPU machine with no network and no Ray
# (configs/finetune_gpu.yaml), beside the capacity experiment configs/experiments/gpu_r64_all.yaml
# on the same distilled rows. Such a machine takes at most 64 MiB a call, so the default model's
# GGUF (xz-compressed, split in two) travels over two calls:
#   bash jobs/gpu_finetune.sh prep     # call 1: kit (wheels, transformers, tokenizer) + GGUF part 1;
#                                    #   a CUDA smoke run of distillation, training and export on a tiny random model
#   bash jobs/gpu_finetune.sh main     # call 2: GGUF part 2; convert, distil, train both, export
# The kit (.gpu/, ignored by git) is made on the development machine; results go to $OUT.
set -u
case "${1:-}" in prep|main) ;; *) echo "usage: bash jobs/gpu_finetune.sh prep|main" >&2; exit 2 ;; esac
W=/tmp/sdsat_gpu
OUT=${OUT:-/tmp/sdsat_gpu_out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 SDSAT_CACHE_DIR=$W/cache SDSAT_DEFAULT_GGUF=$W/model.gguf HOME=$W/home
export PYTHONPATH=$W/slim:$W/site:$PWD
PROMPTS=$(python3 -c "import yaml; print(yaml.safe_load(open('configs/finetune_gpu.yaml'))['distill_prompts'])")
nvidia-smi 2>/dev/null --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader

if [ "$1" = prep ]; then
  cp .gpu/p1 "$W/p1" || exit 1
  mkdir -p "$W/slim" "$W/site" "$W/tok"
  tar xJf .gpu/slim.tar.xz -C "$W/slim" && tar xJf .gpu/tok.tar.xz -C "$W/tok" || exit 1
  [ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .gpu/whl/*.whl || exit 1
  python3 - <<'PY' || exit 1
import torch, transformers, pydantic, datasets, gguf
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
tok = AutoTokenizer.from_pretrained("/tmp/sdsat_gpu/tok")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                     tie_word_embeddings=True))
model.save_pretrained("/tmp/sdsat_gpu/tiny"); tok.save_pretrained("/tmp/sdsat_gpu/tiny")
PY
  python3 jobs/distill_rows.py --prompts configs/data/chat_prompts.json --model $W/tiny --batch-size 8 --max-new-tokens 24 \
    --out $W/tiny_rows.json 2>&1 | tail -3 || exit 1
  python3 jobs/finetune.py --config configs/experiments/gpu_r64_all.yaml --no-ray --use-gpu ${USE_GPU:-true} --model $W/tiny --distill-cache $W/tiny_rows.json \
    --max-steps 6 --warmup-steps 1 --max-minutes none --eval-every 3 --eval-rows 4 --checkpoint-every 3 --name tiny \
    --storage-path $W/runs --export-dir $W/tiny_export 2>&1 | grep -v -i "warn" | tail -12
  ls -la $W/tiny_export $W/runs/tiny
  exit 0
fi

# main
cat "$W/p1" .gpu/p2 > "$W/model.gguf.xz" && xz -d -T0 -f "$W/model.gguf.xz" || exit 1
python3 -c "from sdsat.model.default_model import default_checkpoint as d; print(d())" 2>&1 | grep -v -i warn | tail -2
start=$(date +%s)
python3 jobs/distill_rows.py --prompts "$PROMPTS" --model default-base --batch-size ${DISTILL_BATCH:-256} --max-new-tokens 160 \
  --max-minutes ${DISTILL_MINUTES:-2.2} --out $W/rows.json > "$OUT/distill.log" 2>&1
tail -2 "$OUT/distill.log"; echo "distill: $(( $(date +%s) - start )) s"
for v in A B; do
  conf=configs/finetune_gpu.yaml; [ $v = B ] && conf=configs/experiments/gpu_r64_all.yaml
  python3 jobs/finetune.py --config $conf --no-ray --use-gpu ${USE_GPU:-true} --distill-cache $W/rows.json --storage-path $W/runs \
    --export-dir $W/export$v --max-minutes ${MINUTES:-4.0} ${EXTRA:-} > "$OUT/train$v.log" 2>&1 &
done
wait
for v in A B; do
  grep -v -i warn "$OUT/train$v.log" | grep -E "time budget|step [0-9]+/|export|error|Error" | tail -6
  run=$(ls -d $W/runs/sdsat-gpu-* | grep -E "$([ $v = A ] && echo continue || echo r64)")
  tar cf "$OUT/$v.tar" -C "$W" "export$v" -C "$run" training_curve.png metrics.jsonl 2>/dev/null || tar cf "$OUT/$v.tar" -C "$W" "export$v"
done
split -b 15M -d "$OUT/B.tar" "$OUT/B.tar." && rm "$OUT/B.tar"  # files come back at most 16 MiB each
tar cf "$OUT/logs.tar" -C "$OUT" distill.log trainA.log trainB.log && rm "$OUT"/*.log
ls -la "$OUT"; echo "total: $(( $(date +%s) - start )) s after conversion"
