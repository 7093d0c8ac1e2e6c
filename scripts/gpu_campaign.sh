#!/usr/bin/env bash
# The GPU campaign of issue 16: the paper's results and the GPU speed on one GPU, in two
# parts of at most 6 minutes each (docs/GPU_CAMPAIGN.md gives the exact commands).
#
#   bash scripts/gpu_campaign.sh part1|part2|part3|tiny OUT_DIR [ARCHIVE]
#   bash scripts/gpu_campaign.sh bundle [DIR]      (default DIR: campaign-data/)
#
# part1: the paper preset, seed 0, then capsnet bench (eager fp32 and the fast path,
#        training at batch 128 and 512, inference at 1024).
# part2: paper preset seeds 1 and 2, the seed preset, Fashion-MNIST with the paper preset,
#        MultiMNIST and the affine experiment (CapsNet and CNN), all sharing the GPU at once.
# part3: a second run of at most 10 minutes: the whole model compiled and CUDA
#        graphs benched beside eager fp32 and a timed epoch; the paper preset with the learning
#        rate decayed per epoch (3 seeds, MNIST and Fashion-MNIST), the seed preset for 20
#        epochs and MultiMNIST for longer, all at once.
# tiny:  the runs of all parts on the CPU with tiny settings, in minutes (tests/test_campaign.py);
#        its runs and benches are eager fp32 (scripts/reproduce_gpu.py --tiny compiles).
# bundle: the verified, gzipped MNIST and Fashion-MNIST files that travel with the call.
#
# Each run writes OUT_DIR/NAME/ (summary.json when it finished, campaign.json saying how it
# ran, log.txt). Each training run gets what is left of the part's training budget as
# --time-limit, so a run that cannot finish its epochs stops between them and its summary
# says so (cut_short); any run still going at the part's hard stop is killed, so the part
# ends inside its call. ARCHIVE, when given, is rewritten after every run with the records
# of OUT_DIR (no checkpoints): the GPU machine returns few files, and a time-out keeps it.
#
# Environment: CAMPAIGN_DATA (the bundle; for tiny, a folder of IDX files),
# CAMPAIGN_SECONDS (training budget), CAMPAIGN_STOP (hard stop), PYTHON.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3  # the GPU machine's python3 holds torch; here the project's venv does
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
# capsnet runs from the tree (no install), the same on every machine.
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
tools=("$PYTHON" scripts/campaign_tools.py)
capsnet=("$PYTHON" -m capsnet.cli)

usage="usage: $0 part1|part2|part3|tiny OUT_DIR [ARCHIVE] | $0 bundle [DIR]"
plan=${1:?$usage}
if [ "$plan" = bundle ]; then
    exec "${tools[@]}" bundle "${2:-campaign-data}"
fi
out=${2:?$usage}
archive=${3:-}

case $plan in
part1 | part2 | part3)
    # 6 minutes a call (part 3: 10): ~280 s of training (420), the rest for start-up, tests,
    # benches and packing.
    budget=(280 320)
    [ "$plan" = part3 ] && budget=(420 570)
    seconds=${CAMPAIGN_SECONDS:-${budget[0]}}
    stop=${CAMPAIGN_STOP:-${budget[1]}}
    data=${CAMPAIGN_DATA:-campaign-data}
    device=(--device cuda)
    mnist=(--dataset mnist --data-dir "$data/mnist")
    fashion=(--dataset fashion-mnist --data-dir "$data/fashion-mnist")
    size=()  # the presets as they are: the time limit cuts them
    experiment_size=()
    bench_batches=(128 512) infer_batch=1024 bench_repeats=(--warmup 5 --repeats 20)
    bench_stop=100  # a bench that hangs in compilation must not eat the paper run's time
    threads=2       # 16 cores for up to 6 processes
    # Part 3's paper runs: the learning rate x0.9 each epoch of 430 steps, as public
    # CapsNets that reach 99.66% do, for as many epochs as fit; the seed preset twice as long.
    per_epoch_decay=(--epochs 36 --lr-decay 0.9 --lr-decay-steps 430)
    seed_longer=(--epochs 20)
    fast=(--precision bf16 --compile on)  # the fast path: every training run uses it
    bench_fast=(--precision bf16 --compile) bench_graphs=(--precision bf16 --cuda-graphs)
    ;;
tiny)
    # The budget is spent at once: every run gets the smallest time limit and stops after
    # its first epoch of two, as a GPU run that runs out of time does (cut_short).
    seconds=${CAMPAIGN_SECONDS:-0}
    stop=${CAMPAIGN_STOP:-900}
    data=${CAMPAIGN_DATA:-campaign-data/mnist}
    device=(--device cpu)
    mnist=(--dataset "$data")
    fashion=(--dataset "$data")
    size=(--epochs 2 --train-limit 48 --val-size 20 --batch-size 16 --eval-batch-size 20)
    experiment_size=(--test-limit 10 --figures 1)
    bench_batches=(8) infer_batch=16 bench_repeats=(--warmup 1 --repeats 2)
    bench_stop=$stop
    threads=1  # 2 cores
    per_epoch_decay=(--lr-decay 0.9 --lr-decay-steps 3)
    seed_longer=()
    # Eager fp32: compiling its 15 models and 3 benches took most of the plan's time (the
    # tiny reproduction compiles on the CPU), and bf16 without compiling is slow on a CPU
    # without bf16 instructions.
    fast=(--precision fp32 --compile off)
    bench_fast=(--precision fp32) bench_graphs=(--precision fp32)
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac

mkdir -p "$out"
start=$SECONDS
left() { echo $((stop - (SECONDS - start))); }  # seconds to the hard stop
limit() {                                       # --time-limit: what is left of the budget, >= 1
    local rest=$((seconds - (SECONDS - start)))
    echo $((rest > 1 ? rest : 1))
}

# record NAME TOGETHER AT_MOST [--json-summary] -- COMMAND...: one run and its record.
record() {
    local name=$1 together=$2 at_most=$3
    shift 3
    if [ "$at_most" -lt 5 ]; then
        echo "$name: SKIPPED: the part's hard stop has come" | tee -a "$out/campaign.log"
        return
    fi
    OMP_NUM_THREADS=$threads "${tools[@]}" run "$out" "$name" --plan "$plan" \
        --timeout "$at_most" --together "$together" ${archive:+--archive "$archive"} "$@" ||
        echo "$name: the campaign's own helper failed" | tee -a "$out/campaign.log"
}

bench() {  # bench NAME FLAGS...: capsnet bench's JSON is the run's summary
    local name=$1 at_most
    shift
    at_most=$(left)
    at_most=$((at_most < bench_stop ? at_most : bench_stop))
    record "$name" "$name" "$at_most" --json-summary -- "${capsnet[@]}" bench "${device[@]}" \
        --json "${bench_repeats[@]}" --infer-batch "$infer_batch" "$@"
}

train() {  # train NAME TOGETHER FLAGS...
    local name=$1 together=$2
    shift 2
    record "$name" "$together" "$(left)" -- "${capsnet[@]}" train --run-dir "$out/$name" \
        --no-progress "${device[@]}" "${fast[@]}" --time-limit "$(limit)" "${size[@]}" "$@"
}

experiment() {  # experiment KIND NAME TOGETHER TIME_LIMIT FLAGS...
    local kind=$1 name=$2 together=$3 time_limit=$4
    shift 4
    record "$name" "$together" "$(left)" -- "${capsnet[@]}" experiment "$kind" \
        --run-dir "$out/$name" --no-progress "${device[@]}" "${fast[@]}" \
        --time-limit "$time_limit" "${size[@]}" "${experiment_size[@]}" "${mnist[@]}" "$@"
}

part1() {
    # The paper run first: it needs the whole budget for its 30 epochs; the benches after it
    # take what is left before the hard stop.
    train mnist-paper-s0 mnist-paper-s0 --preset paper --seed 0 "${mnist[@]}"
    for batch in "${bench_batches[@]}"; do
        bench "bench-eager-b$batch" --precision fp32 --train-batch "$batch"
        bench "bench-fast-b$batch" "${bench_fast[@]}" --train-batch "$batch"
    done
}

part2() {
    # All at once: one process rarely fills an H100, and each gets the whole budget.
    local group="mnist-paper-s1 mnist-paper-s2 mnist-seed-s0 fashion-paper-s0 multimnist-s0"
    group+=" affnist-s0"
    local each
    each=$(limit)
    train mnist-paper-s1 "$group" --preset paper --seed 1 "${mnist[@]}" &
    train mnist-paper-s2 "$group" --preset paper --seed 2 "${mnist[@]}" &
    train mnist-seed-s0 "$group" --preset seed --seed 0 "${mnist[@]}" &
    if [ "$plan" = tiny ] || [ -d "$data/fashion-mnist" ]; then
        train fashion-paper-s0 "$group" --preset paper --seed 0 "${fashion[@]}" &
    else
        echo "fashion-paper-s0: SKIPPED: no $data/fashion-mnist (see $data/MANIFEST.txt)" |
            tee -a "$out/campaign.log"
    fi
    experiment multimnist multimnist-s0 "$group" "$each" --seed 0 &
    # The affine experiment trains its two models one after the other: half each, less the
    # second model's start-up and both tests.
    local half=$(((each - 30) / 2))
    experiment affnist affnist-s0 "$group" $((half > 1 ? half : 1)) --seed 0 &
    wait
}

part3() {
    local b=${bench_batches[0]}
    # The whole model compiled, alone first: its speed, and whether the runs below can
    # compile (when it failed they run eager, and their config says so).
    bench "bench-compiled-b$b" "${bench_fast[@]}" --train-batch "$b"
    local compile=()
    [ -f "$out/bench-compiled-b$b/summary.json" ] || compile=(--compile off)
    local group="mnist-paper-decay-s0 mnist-paper-decay-s1 mnist-paper-decay-s2"
    group+=" fashion-paper-decay-s0 mnist-seed-e20-s0 multimnist-long-s0"
    local seed
    for seed in 0 1 2; do
        train "mnist-paper-decay-s$seed" "$group" --preset paper --seed "$seed" \
            "${per_epoch_decay[@]}" "${compile[@]}" "${mnist[@]}" &
    done
    train fashion-paper-decay-s0 "$group" --preset paper --seed 0 "${per_epoch_decay[@]}" \
        "${compile[@]}" "${fashion[@]}" &
    train mnist-seed-e20-s0 "$group" --preset seed --seed 0 "${seed_longer[@]}" \
        "${compile[@]}" "${mnist[@]}" &
    experiment multimnist multimnist-long-s0 "$group" "$(limit)" --seed 0 "${compile[@]}" &
    wait
    # Alone again: eager fp32 beside the compiled model above, then CUDA graphs.
    bench "bench-fp32-b$b" --precision fp32 --train-batch "$b"
    bench "bench-graphs-b$b" "${bench_graphs[@]}" --train-batch "$b"
    [ "$plan" = tiny ] || bench bench-epoch-b128 --precision bf16 --compile --train-batch 128 \
        --epoch --data-dir "$data/mnist"
}

need_cuda=()
[ "$plan" = tiny ] || need_cuda=(--need-cuda)
if ! "${tools[@]}" machine "$out" "${need_cuda[@]}"; then
    [ -z "$archive" ] || "${tools[@]}" pack "$out" "$archive"  # machine.txt says why
    exit 1
fi
case $plan in
part1) part1 ;;
part2) part2 ;;
part3) part3 ;;
tiny) part1 && part2 && part3 ;;
esac
[ -z "$archive" ] || "${tools[@]}" pack "$out" "$archive"
echo "done in $((SECONDS - start)) s; runs:"
cat "$out/campaign.log"
