"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py (and imported by it for
the single-process reference). Each rank trains a tiny BERT on its half of every batch and
writes what it ended with to ``<out>/rank<r>.safetensors``.

Scenarios (one launch, to pay the process start-up once):
- ``scheduled``: a transition at step 3 that starts fresh factors (rank-specific RNG, so
  only the rebuild's broadcast makes them agree) and promotes a block; AdaptiveDDP.
- ``automode``: AutoMode deciding from gradient scores each rank measures on different data.
- ``plain_ddp``: the scheduled run under a DDP built once (the failure AdaptiveDDP prevents).
- ``fsdp2_toggle``: FSDP2 (``fully_shard`` per block), blocks moving FROZEN ↔ FULL at step 3,
  then a refused move to LORA.
- ``fsdp2_spectrum``: Spectrum choosing FULL blocks from SNR computed on sharded weights.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptopt import AdaptiveOptimizer, LayerDecision, Mode, Policy, inject_adapters  # noqa: E402

SCENARIOS = ("scheduled", "automode", "plain_ddp", "fsdp2_toggle", "fsdp2_spectrum")
STEPS = 6
BATCH = 8  # global batch; each of 2 ranks gets 4 rows
RANK_SEED = 1000


class Scheduled(Policy):
    """All LORA except layer 1's attention (FROZEN); at step 3 layer 0 goes FULL and layer 1's
    query starts a rank-2 adapter."""

    method = "scheduled"

    def initial(self, layers, scores):
        return {n: LayerDecision(Mode.FROZEN if "layer.1.attention" in n else Mode.LORA) for n in layers}

    def is_decision_step(self, step, steps_per_epoch):
        return step == 3

    def decide(self, layers, scores, step, steps_per_epoch):
        out = {n: LayerDecision(Mode.FULL) for n in layers if "layer.0." in n}
        out.update({n: LayerDecision(Mode.LORA, 2) for n in layers if n.endswith("layer.1.attention.self.query")})
        return out


class Toggle(Policy):
    """Block 1 FULL, block 0 FROZEN; at step 3 the other way round (no LoRA: FSDP2-compatible)."""

    method = "toggle"

    def initial(self, layers, scores):
        return {n: LayerDecision(Mode.FULL if "layer.1." in n else Mode.FROZEN) for n in layers}

    def is_decision_step(self, step, steps_per_epoch):
        return step == 3

    def decide(self, layers, scores, step, steps_per_epoch):
        return {n: LayerDecision(Mode.FULL if "layer.0." in n else Mode.FROZEN) for n in layers}


def build_model() -> torch.nn.Module:
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # float64: the parity checks compare DDP with one process, and Adam (lr·m/√v) turns a float32
    # difference in summation order on a near-zero gradient into a visible step (3.5e-5 measured
    # under OMP_NUM_THREADS=1); in float64 that noise sits ~nine digits lower, far below the tolerance
    return transformers.BertForSequenceClassification(config).double().train()


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (BATCH, 9), generator=g), torch.randint(0, 2, (BATCH,), generator=g))
            for _ in range(STEPS)]


def make_optimizer(model: torch.nn.Module, scenario: str) -> AdaptiveOptimizer:
    if scenario == "fsdp2_toggle":
        return AdaptiveOptimizer(model, lr=1e-2, policy=Toggle())
    if scenario == "fsdp2_spectrum":
        return AdaptiveOptimizer(model, lr=1e-2, policy={"method": "spectrum", "top_percent": 50})
    if scenario == "automode":
        policy = {"method": "automode", "u": 2, "t": 50, "bottom": 0, "rank": 2, "score_steps": 1}
        return AdaptiveOptimizer(model, lr=1e-2, policy=policy, rank=2, steps_per_epoch=STEPS // 2)
    return AdaptiveOptimizer(model, lr=1e-2, policy=Scheduled(), rank=2)


def train(scenario: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Train and return every parameter, the loss per step and the layer modes (as codes)."""
    model = build_model()
    fsdp = scenario.startswith("fsdp2")
    if fsdp:  # adapters exist before sharding; the optimizer is built on the sharded model
        inject_adapters(model, mode=Mode.FROZEN)
        if world > 1:
            from torch.distributed.fsdp import fully_shard
            for block in model.bert.encoder.layer:
                fully_shard(block)
            fully_shard(model)
    opt = make_optimizer(model, scenario)
    torch.manual_seed(RANK_SEED + rank)  # factors started later differ per rank unless synchronised
    if fsdp:
        runner = model
    elif world > 1 and scenario == "plain_ddp":
        runner = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    elif world > 1:
        from adaptopt.integrations.ddp import AdaptiveDDP
        runner = AdaptiveDDP(model, opt)
    else:
        runner = model
    shard = BATCH // world
    losses = []
    for tokens, labels in batches():
        rows = slice(rank * shard, (rank + 1) * shard)
        loss = runner(input_ids=tokens[rows], labels=labels[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    result = {}
    if fsdp and world > 1:
        name = next(iter(opt.layers))
        modes = [m.mode for m in opt.layers.values()]
        try:
            opt.apply({name: Mode.LORA})
            refused = 0
        except ValueError as err:
            refused = int("FSDP2" in str(err) and modes == [m.mode for m in opt.layers.values()])
        result["lora_refused"] = torch.tensor(refused)
    result.update({f"param/{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                   for n, p in model.named_parameters()})
    result["losses"] = torch.stack(losses)
    result["modes"] = torch.tensor([list(Mode).index(m.mode) * 100 + m.rank for m in opt.layers.values()])
    result["rebuilds"] = torch.tensor(getattr(runner, "rebuilds", -1))
    return result


def main() -> None:
    from safetensors.torch import save_file
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for scenario in SCENARIOS:
        result = train(scenario, rank, world)
        save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"{scenario}.rank{rank}.safetensors"))
    torch.distributed.barrier()  # nobody tears down gloo while a peer still communicates
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
