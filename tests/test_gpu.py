"""The CUDA paths, on a GPU machine (skipped here; ``scripts/gpu_check.sh`` runs exactly these):
the fused LoRA nodes in bf16 / fp16 against the float64 formula, autocast through the composite
path, bitsandbytes' CUDA 4-bit kernels, and DDP over NCCL with a mid-run transition."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adaptopt import LoRALinear
from tests.helpers import randomize_adapter, torchrun
from tests.test_fused import assert_matches_reference

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_fused_node_on_cuda_matches_the_formula(dtype):
    torch.manual_seed(0)
    module = LoRALinear(nn.Linear(256, 192), rank=16, alpha=32).to(CUDA, dtype)
    randomize_adapter(module, std=0.05)
    x = torch.randn(4, 33, 256, device=CUDA, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    assert type(out.grad_fn).__name__ == "FusedLoRALinearBackward"
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_matches_reference(module, x, xg, out, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fused_4bit_node_on_cuda_matches_the_formula_on_deq_q(dtype):
    pytest.importorskip("bitsandbytes")
    from adaptopt import QuantLoRALinear
    from adaptopt.layers.quant import dequantize
    torch.manual_seed(0)
    module = QuantLoRALinear(nn.Linear(256, 192).to(CUDA, dtype), rank=16, alpha=32)
    module.lora_A.data, module.lora_B.data = module.lora_A.data.to(dtype), module.lora_B.data.to(dtype)
    randomize_adapter(module, std=0.05)
    x = torch.randn(4, 33, 256, device=CUDA, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    out = module(xg)
    assert type(out.grad_fn).__name__ == "FusedQuantLoRALinearBackward"
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_matches_reference(module, x, xg, out, grad, weight=dequantize(module.base))


def test_autocast_goes_through_the_composite_path_and_trains():
    torch.manual_seed(0)
    module = LoRALinear(nn.Linear(128, 64), rank=8).to(CUDA)
    randomize_adapter(module, std=0.05)
    x = torch.randn(8, 128, device=CUDA)
    expected = module(x).detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ != "FusedLoRALinearBackward"
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert module.lora_A.grad is not None and module.lora_B.grad is not None


def test_bitsandbytes_cuda_kernels_under_a_4bit_layer_in_every_mode():
    pytest.importorskip("bitsandbytes")
    from adaptopt import Mode, QuantLoRALinear
    torch.manual_seed(0)
    layer = QuantLoRALinear(nn.Linear(128, 64).to(CUDA), rank=8,
                            quantize={"quant_type": "nf4", "compute_dtype": torch.bfloat16})
    x = torch.randn(5, 128, device=CUDA)  # float32 input, bfloat16 compute: bitsandbytes' own kernel path
    for mode in (Mode.LORA, Mode.FULL, Mode.FROZEN, Mode.LORA):
        before = layer(x).detach()
        layer.set_mode(mode)
        torch.testing.assert_close(layer(x).detach(), before, rtol=2e-2, atol=2e-2)
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None


NCCL_WORKER = """
import json, sys, torch, torch.distributed as dist, transformers
from adaptopt import AdaptiveOptimizer
from adaptopt.integrations.ddp import AdaptiveDDP
dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(rank)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=256, hidden_size=64,
    intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).cuda()
opt = AdaptiveOptimizer(model, lr=1e-3, policy={"method": "automode", "u": 2, "t": 50, "score_steps": 1},
                        steps_per_epoch=6)
ddp = AdaptiveDDP(model, opt)
g = torch.Generator().manual_seed(100 + rank)
for _ in range(6):
    ids = torch.randint(0, 256, (2, 32), generator=g).cuda()
    ddp(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad()
flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if rank == 0:
    same = all(torch.equal(gathered[0], t) for t in gathered[1:])
    json.dump({"identical": same, "transitions": len(opt.history)}, open(sys.argv[1], "w"))
dist.barrier(); dist.destroy_process_group()
"""


def test_ddp_over_nccl_keeps_ranks_identical_through_transitions(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    script = tmp_path / "nccl_worker.py"
    script.write_text(NCCL_WORKER)
    run = torchrun(script, tmp_path / "result.json", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["identical"] and result["transitions"] >= 1
