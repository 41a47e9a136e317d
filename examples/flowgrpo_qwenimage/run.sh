#!/usr/bin/env bash
# FlowGRPO on Qwen-Image with a LoRA and the PickScore reward, on one GPU.
#   MODEL=/models/Qwen-Image PICKSCORE=/models/PickScore_v1 PROMPTS=prompts.txt bash run.sh [overrides...]
# FAST=1 selects the no-CFG CPS variant (one transformer pass per step).
set -euo pipefail
: "${MODEL:?set MODEL to a diffusers Qwen-Image folder}"
: "${PICKSCORE:?set PICKSCORE to a local PickScore (CLIP) folder}"
: "${PROMPTS:?set PROMPTS to a prompt file (.txt, one per line)}"
CONFIG=flowgrpo_qwenimage
[ "${FAST:-0}" = 1 ] && CONFIG=flowgrpo_qwenimage_fast

python -m verl_diffusion_rollout.main_flowgrpo --config-name "$CONFIG" \
    actor_rollout_ref.model.path="$MODEL" \
    reward.options.pickscore.model_path="$PICKSCORE" \
    data.train_files="$PROMPTS" \
    "$@"
