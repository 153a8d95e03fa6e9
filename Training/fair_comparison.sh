#!/usr/bin/env bash
# The fair ProbSAM vs Prob U-Net comparison: an equal training-compute budget per run, 3 seeds each.
#
#   Training/fair_comparison.sh [BUDGET_S] [SECONDS_PER_STEP_PROBSAM] [SECONDS_PER_STEP_UNET]
#
# The budget is compute, not contended wall time: each model's single-thread seconds per step (batch 16,
# 128² crops) is measured once in a short run (Training/README.md, "Fair comparison"), and each model gets
# max_steps = BUDGET_S / seconds_per_step. Warm-up (5 %), KL annealing (30 %) and the evaluation interval
# (1/4) scale with max_steps, so both models see the same schedule shape; early stopping on validation
# GED@16 (48 seeded validation slices, patience 2 evaluations) may end a run sooner, never later.
# Validation is not counted in the budget (train.py logs train_seconds, the steps' time, separately). Runs are resumable: rerunning this
# script continues every unfinished run from its ckpt.pt and skips finished ones. Two lanes run at once
# (one per model), one thread each.
set -euo pipefail
budget=${1:-600}
probsam_s=${2:-1.07}
unet_s=${3:-10.07}
data=${DATA:-data/phantom}
root=${RUNS:-runs/fair}
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
            eval_slices=48 early_stop_patience=2 num_threads=1 >"$out.log" 2>&1
    done
}

run_lane Training/configs/phantom_tiny.yaml "$probsam_s" probsam_tiny &
run_lane Training/configs/phantom_prob_unet.yaml "$unet_s" prob_unet &
wait
