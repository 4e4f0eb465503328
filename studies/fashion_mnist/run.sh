#!/usr/bin/env bash
# The Fashion-MNIST study, every step in order (each resumable: rerun after an interruption).
#   bash studies/fashion_mnist/run.sh                 # first 1000 test images (what studies/fashion_mnist/README.md reports; sensitivity: 500)
#   N_TEST=10000 bash studies/fashion_mnist/run.sh    # the full test set (~40 core-hours of attacks on this CPU)
# A larger N_TEST reuses the finished batches of the smaller runs in $OUT (evaluate.py --extend-from).
# Some committed runs in results/fashion_mnist were made with earlier MSA defaults (their settings.json says which;
# evaluate.py refuses to mix settings in one folder): OUT=<a new folder> redoes every step with today's defaults.
# Set TRAIN=1 to retrain the base and the control and rerun the sweep instead of using the weights shipped in
# timm_hpm/weights/. The held-out design-space study is recipes/study.py (studies/fashion_mnist/configs/study.yaml).
# The test-set runs go to $OUT; the tuning sweep and the held-out study, this study's own results, to $STUDY_OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
N_TEST=${N_TEST:-1000}
N_SENS=${N_SENS:-500}
N_BATCHINGS=${N_BATCHINGS:-250}
OUT=${OUT:-results/fashion_mnist}
STUDY_OUT=${STUDY_OUT:-studies/fashion_mnist/results}
COMMON=(--dataset fashion_mnist --eps 0.1 --batch-size 250 --device cpu)
EVAL=("${COMMON[@]}" --n-examples "$N_TEST")

if [ "${TRAIN:-0}" = 1 ]; then
    # 1. the base: PGD-AT from scratch (~45 min on 2 cores), shipped as small_cnn.fmnist_pgdat
    $PY recipes/finetune.py --config recipes/configs/fashion_mnist_base.yaml --device cpu \
        $( [ -f runs/fashion_mnist_base/config.yaml ] && echo --resume runs/fashion_mnist_base )
    cp runs/fashion_mnist_base/final/model.safetensors timm_hpm/weights/small_cnn.fmnist_pgdat.safetensors
    # 1b. the budget-matched control: the base + plain PGD-AT with the HPM fine-tune's budget
    $PY recipes/finetune.py --config recipes/configs/fashion_mnist_control.yaml --device cpu \
        $( [ -f runs/fashion_mnist_control/config.yaml ] && echo --resume runs/fashion_mnist_control )
    cp runs/fashion_mnist_control/final/model.safetensors timm_hpm/weights/small_cnn.fmnist_control.safetensors
    # 2. HPM options and budget, scored on held-out training images; the best run is shipped as hpm_small_cnn.fmnist_hpm
    $PY recipes/tune_hpm.py --sweep studies/fashion_mnist/configs/hpm_sweep.yaml --out "$STUDY_OUT/tuning"
    BEST=$($PY -c "import json; print(json.load(open('$STUDY_OUT/tuning/tuning.json'))['best'])")
    cp "runs/tune/$BEST/final/model.safetensors" timm_hpm/weights/hpm_small_cnn.fmnist_hpm.safetensors
fi

# EXTEND=(--extend-from <the other finished runs of the same evaluation, $1_<number of images>>): their batches are
# reused where they cover the same examples, not recomputed (a folder with more after $1_, such as
# eval_hpm_msa4_b1000_1000, is another evaluation: evaluate.py refuses to extend from other settings)
reuse() {
    local d
    EXTEND=()
    for d in "$OUT/$1"_[0-9]*; do
        if [ "$d" != "$2" ] && [ -f "$d/attack/fingerprint.json" ]; then EXTEND+=("$d"); fi
    done
    if (( ${#EXTEND[@]} )); then EXTEND=(--extend-from "${EXTEND[@]}"); fi
}

# 3. test-set evaluation: base and budget-matched control (AutoAttack), the static l2 head (AutoAttack), HPM dynamic (MSA)
reuse eval_base "$OUT/eval_base_$N_TEST"
$PY recipes/evaluate.py --model small_cnn.fmnist_pgdat --protocol autoattack "${EVAL[@]}" --out "$OUT/eval_base_$N_TEST" \
    "${EXTEND[@]}"
reuse eval_control "$OUT/eval_control_$N_TEST"
$PY recipes/evaluate.py --model small_cnn.fmnist_control --protocol autoattack "${EVAL[@]}" \
    --out "$OUT/eval_control_$N_TEST" "${EXTEND[@]}"
reuse eval_static "$OUT/eval_static_$N_TEST"
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --hpm-mode static --protocol autoattack "${EVAL[@]}" \
    --out "$OUT/eval_static_$N_TEST" "${EXTEND[@]}"
# (MSA v4, the defaults since the transfer from the base was dropped; eval_hpm_msa3_$N_TEST and eval_hpm_$N_TEST
# hold the runs of earlier defaults)
reuse eval_hpm_msa4 "$OUT/eval_hpm_msa4_$N_TEST"
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol msa "${EVAL[@]}" --batchings default \
    --out "$OUT/eval_hpm_msa4_$N_TEST" "${EXTEND[@]}"
# 3a. how a weaker evaluation would read: the paper's protocol (AutoAttack on each surrogate view, transferred, a
#     per-sample worst case) on the first N_LADDER images, and the MSA run cut to the same images (copied batches)
N_LADDER=${N_LADDER:-250}  # one batch of 250: the paper protocol took 4,407 s of attacks at one thread
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol msa "${COMMON[@]}" --n-examples "$N_LADDER" \
    --batchings default --surrogate-autoattack --no-surrogate-apgd --no-cascade --combine-rounds 0 \
    --no-score-iterates --no-base-surrogate --out "$OUT/eval_hpm_paper_$N_LADDER"
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol msa "${COMMON[@]}" --n-examples "$N_LADDER" \
    --batchings default --out "$OUT/eval_hpm_msa4_$N_LADDER" --extend-from "$OUT/eval_hpm_msa4_$N_TEST"
$PY recipes/weaker_evaluations.py --msa "$OUT/eval_hpm_msa4_$N_LADDER" --paper "$OUT/eval_hpm_paper_$N_LADDER"
# 3b. MSA per batching (default, shuffled, single = batch size 1) on fewer images: ~1500-1800 s per 250 images for
#     each batching of 250, ~17 s per image (median 18.5 s) for single on this CPU. At the default N_BATCHINGS=250 (= the batch
#     size) the shuffled batch has the same members as the default one: a second MSA run with other random starts.
reuse eval_hpm_batchings "$OUT/eval_hpm_batchings_$N_BATCHINGS"
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol msa "${COMMON[@]}" --n-examples "$N_BATCHINGS" \
    --batchings default shuffled single --out "$OUT/eval_hpm_batchings_$N_BATCHINGS" "${EXTEND[@]}"
# 3c. the batch order a class-folder dataset gives (timm's validate.py): clean accuracy by order and batch size,
#     and MSA on the worst natural batching (class-sorted, batches of 32) of the first N_BATCHINGS images
$PY recipes/batch_order_table.py --model hpm_small_cnn.fmnist_hpm small_cnn.fmnist_pgdat --n-test "$N_TEST" \
    --out "$OUT/batch_order_$N_TEST" || true  # refuses to overwrite a finished table
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol msa --dataset fashion_mnist --eps 0.1 \
    --batch-size 32 --device cpu --n-examples "$N_BATCHINGS" --batchings class_sorted \
    --out "$OUT/eval_hpm_class_sorted_b32_$N_BATCHINGS"
# 3d. batch poisoning: k of the 250 members of each fixed batch perturbed to flip the untouched ones (attack v2, full
#     strength; poison_hpm_250 is the earlier one-run attack, 50 steps, kept for comparison)
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol poison --dataset fashion_mnist --eps 0.1 \
    --n-examples "$N_BATCHINGS" --batch-size 250 --device cpu --out "$OUT/poison_v2_hpm_$N_BATCHINGS"
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol poison --dataset fashion_mnist --eps 0.1 \
    --n-examples "$N_TEST" --batch-size 250 --device cpu --out "$OUT/poison_v2_hpm_${N_TEST}_b250"
# 4. sensitivity analysis (FC head vs l2 head of the HPM model)
$PY recipes/sensitivity.py --model hpm_small_cnn.fmnist_hpm --dataset fashion_mnist --eps-max 0.2 \
    --n-examples "$N_SENS" --out "$OUT/sensitivity_$N_SENS"
# 5. the Hub-ready folder and the generated card, copied to hub_cards/hpm_small_cnn.fmnist_hpm.md; nothing is uploaded
BEST=$($PY -c "import json; print(json.load(open('$STUDY_OUT/tuning/tuning.json'))['best'])")
$PY recipes/push_to_hub.py --model hpm_small_cnn.fmnist_hpm --training-config "$STUDY_OUT/tuning/configs/$BEST.yaml" \
    --results "$OUT/eval_hpm_msa4_$N_TEST/eval.json" --base-results "$OUT/eval_base_$N_TEST/eval.json" \
    --control-results "$OUT/eval_control_$N_TEST/eval.json" \
    --batch-order "$OUT/batch_order_$N_TEST/table.json" \
    --natural-results "$OUT/eval_hpm_class_sorted_b32_$N_BATCHINGS/eval.json" \
    --poisoning-results "$OUT/poison_v2_hpm_${N_TEST}_b250/eval.json" \
    --base-model timm-hpm/small_cnn.fmnist_pgdat --repo-id timm-hpm/hpm_small_cnn.fmnist_hpm --license apache-2.0 --dry-run \
    --cards-dir hub_cards --overwrite-card
# 6. the held-out design-space study (every candidate and its budget-matched control fine-tuned and scored on
#    held-out training images, never the test set; about 8 hours of the 2 cores) and, at full strength on the test
#    images, the candidates it ranked first: the shipped model on evaluation batches of 1,000 (hpm_eval_b1000) and
#    the 1,500-step model (steps_1500, seed 0) under MSA, with its own budget-matched control under AutoAttack
#    (the 150-step control is eval_control_$N_TEST above); the 1,500-step model also on batches of one and
#    class-sorted batches of 32 (the worst natural batching of the shipped model) on the first N_BATCHINGS images
$PY recipes/study.py --study studies/fashion_mnist/configs/study.yaml --out "$STUDY_OUT/study"
reuse eval_hpm_msa4_b1000 "$OUT/eval_hpm_msa4_b1000_$N_TEST"
$PY recipes/evaluate.py --model hpm_small_cnn.fmnist_hpm --protocol msa "${EVAL[@]}" --batch-size 1000 \
    --batchings default --out "$OUT/eval_hpm_msa4_b1000_$N_TEST" "${EXTEND[@]}"
reuse eval_study_steps_1500_msa4 "$OUT/eval_study_steps_1500_msa4_$N_TEST"
$PY recipes/evaluate.py --model local-dir:runs/study/steps_1500/seed0/final --protocol msa "${EVAL[@]}" \
    --batchings default --out "$OUT/eval_study_steps_1500_msa4_$N_TEST" "${EXTEND[@]}"
reuse eval_study_control_1500 "$OUT/eval_study_control_1500_$N_TEST"
$PY recipes/evaluate.py --model local-dir:runs/study/control_1500/seed0/final --protocol autoattack "${EVAL[@]}" \
    --out "$OUT/eval_study_control_1500_$N_TEST" "${EXTEND[@]}"
$PY recipes/evaluate.py --model local-dir:runs/study/steps_1500/seed0/final --protocol msa "${COMMON[@]}" \
    --n-examples "$N_BATCHINGS" --batchings single --out "$OUT/eval_study_steps_1500_single_$N_BATCHINGS"
$PY recipes/evaluate.py --model local-dir:runs/study/steps_1500/seed0/final --protocol msa --dataset fashion_mnist \
    --eps 0.1 --batch-size 32 --device cpu --n-examples "$N_BATCHINGS" --batchings class_sorted \
    --out "$OUT/eval_study_steps_1500_class_sorted_b32_$N_BATCHINGS"
