#!/usr/bin/env bash
# The fair ProbSAM vs Prob U-Net comparison: an equal training-compute budget per run, 3 seeds each.
#
#   research/fair_comparison.sh [BUDGET_S] [SECONDS_PER_STEP_PROBSAM] [SECONDS_PER_STEP_UNET] [LANES]
#
# LANES: "both" (default: two lanes at once, one thread each), "probsam" or "unet" (one lane, e.g. to
# start the other one later). Environment: DATA, RUNS, PROBSAM_CONFIG, UNET_CONFIG (defaults below).
#
# The budget is compute, not contended wall time: each model's single-thread seconds per step (batch 16,
# 128² crops) is measured once in a short run (research/DIARY.md, "Fair comparison"), and each model gets
# max_steps = BUDGET_S / seconds_per_step. Warm-up (5 %), KL annealing (30 %) and the evaluation interval
# (1/4) scale with max_steps, so both models see the same schedule shape; early stopping on validation
# GED@16 (128 seeded validation slices, patience 2 evaluations) may end a run sooner, never later.
# Validation is not counted in the budget (train.py logs train_seconds, the steps' time, separately). Runs are resumable: rerunning this
# script continues every unfinished run from its ckpt.pt and skips finished ones. Two lanes run at once
# (one per model), one thread each.
set -euo pipefail
budget=${1:-1500}
probsam_s=${2:-1.48}
unet_s=${3:-8.24}
lanes=${4:-both}
data=${DATA:-data/phantom_v2}
root=${RUNS:-runs/fair_v2}
probsam_config=${PROBSAM_CONFIG:-research/configs/phantom_v2_probsam.yaml}
unet_config=${UNET_CONFIG:-Training/configs/phantom_v2_prob_unet.yaml}
mkdir -p "$root"

run_lane() {  # config seconds_per_step name
    local config=$1 per_step=$2 name=$3
    local steps warmup anneal interval
    steps=$(python -c "print(max(6, round($budget / $per_step)))")
    warmup=$(python -c "print(max(1, round(0.05 * $steps)))")
    anneal=$(python -c "print(max(1, round(0.30 * $steps)))")
    interval=$(python -c "print(max(1, $steps // 4))")
    for seed in 0 1 2; do
        local out="$root/${name}_seed$seed"
        if [ -f "$out/last.safetensors" ]; then echo "$out: finished"; continue; fi
        local resume=()
        if [ -f "$out/ckpt.pt" ]; then resume=(--resume); fi
        OMP_NUM_THREADS=1 python Training/train.py "$config" "${resume[@]}" data="$data" out="$out" seed=$seed \
            max_steps=$steps warmup_steps=$warmup anneal_steps=$anneal eval_interval=$interval \
            eval_slices=128 early_stop_patience=2 num_threads=1 >"$out.log" 2>&1
    done
}

if [ "$lanes" != unet ]; then run_lane "$probsam_config" "$probsam_s" probsam_tiny & fi
if [ "$lanes" != probsam ]; then run_lane "$unet_config" "$unet_s" prob_unet & fi
wait
