#!/usr/bin/env bash
# One command on a GPU machine: do the CUDA paths work, and what do they cost?
# Sets up .venv (torch==2.13.0 from PyPI is its CUDA build there), runs exactly the tests marked
# `gpu` (fused nodes in bf16/fp16, autocast, bitsandbytes' CUDA 4-bit kernels, DDP over NCCL when
# two GPUs exist), then the GPU step-time benchmark, which prints LoRA/full and QLoRA/LoRA ratios, the
# memory estimate against measured CUDA peaks (estimate / measured per policy), and the compute
# estimate against measured step times (FLOPs / LoRA against time / LoRA per policy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device here (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'));"
  echo "run this on a GPU machine with a CUDA build of torch"
  exit 2
fi
.venv/bin/python -m pytest -m gpu -v -rs tests/test_gpu.py
.venv/bin/python tests/benchmarks/gpu_step_time.py
# the memory estimate against torch.cuda.max_memory_allocated, every policy in a fresh process (bf16 weights)
.venv/bin/python tests/benchmarks/memory_estimate.py --device cuda --dtype bfloat16 --out results/memory_estimate_cuda
.venv/bin/python tests/benchmarks/memory_estimate.py --device cuda --autocast bfloat16 --out results/memory_estimate_cuda_amp
# the compute estimate against CUDA run times (FLOPs / LoRA's vs time / LoRA's per policy; bf16, 8 x 512)
.venv/bin/python tests/benchmarks/compute_estimate.py --device cuda --dtype bfloat16 --batch 8 --seq 512 --steps 20 --out results/compute_estimate_cuda
# AdamW's update of the default's FULL blocks by kernel (fused, the default where torch has it, against foreach)
.venv/bin/python tests/benchmarks/adamw_kernel.py --device cuda
