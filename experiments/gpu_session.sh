#!/usr/bin/env bash
# One prepared run on a GPU machine (an H100/H200, ~10 minutes), from the repo root with OUT set:
#   OUT=/tmp/out bash experiments/gpu_session.sh
# 1. issue #5: python -m icons.bench.throughput (LLaVA-1.5-7B-shaped, random weights, paper LoRA,
#    kronecker 5120) -- examples/s, tokens/s, peak memory, GPU-hours for 665K;
# 2. issue #4: python -m icons.bench.features on the GPU (tiny model; rademacher and kronecker),
#    and the FSDP test (tests/test_fsdp_gpu.py);
# 3. issue #2, after the timings (so nothing shares the GPU while they run): a stage-1 base from
#    scratch on stream v7 (two-hop choice in the mix), and LM-only two-hop (multiple-choice)
#    learning curves of fresh language models at three sizes, in parallel, until the deadline.
# DRY=1: the same steps at toy sizes on the CPU (checks the script before spending device time).
set -u
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then DEV=cpu ACC=cpu SIZE=tiny N=16 STEPS=40 LM=64 EX=64; else DEV=cuda ACC=gpu SIZE=7b N=256 STEPS=12000 LM=96000 EX=288000; fi
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
# hydra-core, omegaconf and antlr4-python3-runtime are not on the lent machines' image: carry them as
# wheels in .whl/ (device README) for the FSDP test; the benchmarks do not need them.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ "$DRY" = 1 ]; then TP="--examples 16 --val 4 --batch-size 4 --dim 256 --r 8 --alpha 16 --train-batches 1 --bs1-examples 2"; else TP=""; fi
timeout 200 python3 -m icons.bench.throughput --size $SIZE --device $DEV $TP > $OUT/throughput.txt 2>&1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
  for proj in rademacher kronecker; do
    timeout 75 python3 -m icons.bench.features --device $DEV --examples $N --batch-size 32 --dim 1024 --repeats 3 --projection $proj
  done
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fsdp_gpu.py
} > $OUT/bench.txt 2>&1
echo "benchmarks done at $(( $(date +%s) - START ))s" >> $OUT/bench.txt

mkdir -p bases
train_base() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=2 timeout $(left) python3 -m icons.models.base --accelerator $ACC --examples $EX --out bases/$name "$@" > bases/$name.log 2>&1 \
    && OMP_NUM_THREADS=2 timeout 60 python3 -m icons.models.probe bases/$name > bases/$name.probe 2>&1
}
curve() {
  OMP_NUM_THREADS=1 timeout $(left) python3 experiments/lm_lookup.py --device $DEV --eval-every $(( STEPS / 12 )) --out $OUT/lm_curves.jsonl "$@" \
    >> $OUT/logs.txt 2>&1
}
# A base pretrained from scratch on stream v7, and two-hop curves of fresh language models at three
# sizes (does a larger LM compose look-up and letter sooner?). Earlier curves: docs/findings.md.
train_base c_s7 --stream 7 --lm-examples $LM --phases none &
curve --two-hop --steps $STEPS &
curve --two-hop --layers 6 --hidden 256 --heads 8 --steps $STEPS &
curve --two-hop --layers 8 --hidden 384 --heads 8 --steps $STEPS &
wait
tail -n 3 bases/*.log >> $OUT/logs.txt 2>&1
tar czf $OUT/bases.tgz bases
echo "all done at $(( $(date +%s) - START ))s" >> $OUT/bench.txt
