"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py (and imported by it for
the single-process reference). Each rank trains a tiny BERT on its half of every batch and
writes what it ended with to ``<out>/rank<r>.safetensors``.

Scenarios (one launch, to pay the process start-up once):
- ``scheduled``: a transition at step 3 that starts fresh factors (rank-specific RNG, so
  only the rebuild's broadcast makes them agree) and promotes a block; AdaptiveDDP.
- ``automode``: AutoMode deciding from gradient scores each rank measures on different data.
- ``plain_ddp``: the scheduled run under a DDP built once (the failure AdaptiveDDP prevents).
- ``fsdp2_toggle``: FSDP2 (``fully_shard`` per block), blocks moving FROZEN ↔ FULL at step 3.
- ``fsdp2_spectrum``: Spectrum choosing FULL blocks from SNR computed on sharded weights.
- ``fsdp2_lora``: static LoRA on sharded base weights (replicated factors).
- ``fsdp2_every``: every transition on sharded weights (LORA → FULL / FROZEN folds, FROZEN /
  FULL → LORA starts, rank growth and cut); ``save_adapters``, ``export_merged`` and
  ``export_peft`` (SVD for FULL layers) from the sharded model; then ``merge()`` of every layer.
- ``fsdp2_resume``: ``fsdp2_every`` stopped after step 3, saved to disk (the whole model through
  ``get_model_state_dict``, the optimizer's state dict, rank 0's RNG state), rebuilt from
  scratch, loaded and continued. (``fsdp2_continue``, run by the test in one process, continues
  from that checkpoint.)
- ``fsdp2_automode``: AutoMode over sharded weights, deciding from scores on different data.
- ``fsdp2_pissa``: PiSSA adapters started on sharded weights (the SVD of the gathered weight,
  each rank keeping its rows of the residual).
- ``fsdp2_4bit``: a 4-bit model under fully_shard: the optimizer refuses it, naming the layers.
- ``fsdp2_accumulate``: ``fsdp2_automode`` with two accumulated micro-batches per step.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adaptopt import (  # noqa: E402
    AdaptiveOptimizer,
    LayerDecision,
    Mode,
    Policy,
    export_merged,
    export_peft,
    inject_adapters,
    save_adapters,
)

SCENARIOS = ("scheduled", "automode", "plain_ddp", "fsdp2_toggle", "fsdp2_spectrum", "fsdp2_lora", "fsdp2_every",
             "fsdp2_resume", "fsdp2_automode", "fsdp2_pissa", "fsdp2_4bit", "fsdp2_accumulate")
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


class EveryMove(Policy):
    """Every kind of move, on sharded weights: block 0 LORA r2 and block 1 FROZEN except its
    output.dense (FULL); at step 2 block 0's attention LORA → FULL, its intermediate r2 → r4
    (growth), its output.dense r2 → r1 (a cut: the remainder folds into W), block 1's query
    FROZEN → LORA and its output.dense FULL → LORA; at step 4 block 0's attention FULL → LORA,
    its intermediate LORA → FROZEN, block 1's query LORA → FULL."""

    method = "every_move"

    def initial(self, layers, scores):
        return {n: LayerDecision(Mode.LORA if "layer.0." in n else Mode.FULL if n.endswith("layer.1.output.dense")
                                 else Mode.FROZEN) for n in layers}

    def is_decision_step(self, step, steps_per_epoch):
        return step in (2, 4)

    def decide(self, layers, scores, step, steps_per_epoch):
        if step == 2:
            moves = {"layer.0.attention": LayerDecision(Mode.FULL), "layer.0.intermediate": LayerDecision(Mode.LORA, 4),
                     "layer.0.output.dense": LayerDecision(Mode.LORA, 1),
                     "layer.1.attention.self.query": LayerDecision(Mode.LORA, 2),
                     "layer.1.output.dense": LayerDecision(Mode.LORA, 2)}
        else:
            moves = {"layer.0.attention": LayerDecision(Mode.LORA, 2),
                     "layer.0.intermediate": LayerDecision(Mode.FROZEN),
                     "layer.1.attention.self.query": LayerDecision(Mode.FULL)}
        return {n: d for n in layers for part, d in moves.items() if f".{part}." in f"{n}."}


def build_model() -> torch.nn.Module:
    import transformers
    torch.manual_seed(0)
    # intermediate_size 33: FSDP2 splits the intermediate weight unevenly (17 + 16 rows)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=33, max_position_embeddings=64, num_labels=2,
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
    if scenario in ("fsdp2_lora", "fsdp2_pissa", "fsdp2_4bit"):
        return AdaptiveOptimizer(model, lr=1e-2, policy="lora")
    if scenario in ("fsdp2_every", "fsdp2_resume", "fsdp2_continue"):
        return AdaptiveOptimizer(model, lr=1e-2, policy=EveryMove())
    if scenario in ("automode", "fsdp2_automode", "fsdp2_accumulate"):
        policy = {"method": "automode", "u": 2, "t": 50, "bottom": 0, "rank": 2, "score_steps": 1}
        return AdaptiveOptimizer(model, lr=1e-2, policy=policy, rank=None if scenario.startswith("fsdp2") else 2,
                                 steps_per_epoch=STEPS // 2)
    return AdaptiveOptimizer(model, lr=1e-2, policy=Scheduled(), rank=2)


def build(scenario: str, rank: int, world: int) -> tuple[torch.nn.Module, AdaptiveOptimizer, torch.nn.Module]:
    """The model (sharded per block under FSDP2), its optimizer and what runs the batches."""
    model = build_model()
    fsdp = scenario.startswith("fsdp2")
    if fsdp:  # adapters exist before sharding; the optimizer is built on the sharded model
        options = {"pissa": {"init": "pissa"}, "4bit": {"quantize": "nf4"}}.get(scenario.split("_")[1], {})
        if scenario == "fsdp2_4bit":
            model = model.float()  # bitsandbytes quantizes float32 / bf16 weights
        inject_adapters(model, mode=Mode.FROZEN, rank=2, alpha=3.0, **options)
        if world > 1:
            from torch.distributed.fsdp import fully_shard
            for block in model.bert.encoder.layer:
                fully_shard(block)
            fully_shard(model)
    torch.manual_seed(RANK_SEED + rank)  # factors started later differ per rank unless synchronised
    opt = make_optimizer(model, scenario)
    if fsdp:
        runner = model
    elif world > 1 and scenario == "plain_ddp":
        runner = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    elif world > 1:
        from adaptopt.integrations.ddp import AdaptiveDDP
        runner = AdaptiveDDP(model, opt)
    else:
        runner = model
    return model, opt, runner


def run_steps(runner: torch.nn.Module, opt: AdaptiveOptimizer, steps: list, rank: int, world: int,
              micro_batches: int = 1) -> list:
    """Each rank takes its rows of every batch, in ``micro_batches`` accumulated pieces."""
    shard = BATCH // world
    piece = shard // micro_batches
    losses = []
    for tokens, labels in steps:
        loss = 0.0
        for m in range(micro_batches):
            rows = slice(rank * shard + m * piece, rank * shard + (m + 1) * piece)
            part = runner(input_ids=tokens[rows], labels=labels[rows]).loss / micro_batches
            part.backward()
            loss = loss + part.detach()
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    return losses


def save_whole(model: torch.nn.Module, opt: AdaptiveOptimizer, folder: Path, rank: int, world: int) -> None:
    """Rank 0 writes the whole model (``get_model_state_dict(full_state_dict=True)``, safetensors)
    and the optimizer's state dict (whole moments) — a checkpoint any world size can load."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    optimizer = opt.state_dict()  # every rank joins the gathers
    if rank == 0:  # with rank 0's RNG state: fresh factors after the restart are drawn by rank 0, as they were
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(folder / "rng.safetensors"))
        torch.save(optimizer, folder / "optimizer.pt")
    if world > 1:
        torch.distributed.barrier()


def load_whole(model: torch.nn.Module, opt: AdaptiveOptimizer, folder: Path) -> None:
    """Modes first (factors of the saved ranks), then the weights, each rank taking its rows."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    set_model_state_dict(model, load_file(str(folder / "model.safetensors")),
                         options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])


def train(scenario: str, rank: int = 0, world: int = 1, folder: Path | None = None) -> dict[str, torch.Tensor]:
    """Train and return every parameter, the loss per step and the layer modes (as codes).
    ``folder``: where ``fsdp2_resume`` writes its checkpoint (a fresh temporary one if None)."""
    if scenario == "fsdp2_4bit":
        try:
            build(scenario, rank, world)
            return {"refused": torch.tensor(0)}
        except ValueError as err:
            return {"refused": torch.tensor(int(world > 1 and "4-bit layers were sharded" in str(err)))}
    model, opt, runner = build(scenario, rank, world)
    data = batches()
    if scenario == "fsdp2_resume":
        losses = run_steps(runner, opt, data[:3], rank, world)
        if folder is None:
            import tempfile
            folder = Path(tempfile.mkdtemp())
        save_whole(model, opt, folder, rank, world)
        del model, opt, runner
        model, opt, runner = build(scenario, rank, world)
        torch.manual_seed(RANK_SEED + 7 * rank + 1)  # the restored factors must come from the checkpoint
        load_whole(model, opt, folder)
        losses += run_steps(runner, opt, data[3:], rank, world)
    elif scenario == "fsdp2_continue":  # one process picks up what fsdp2_resume saved (any world size)
        load_whole(model, opt, folder)
        losses = run_steps(runner, opt, data[3:], rank, world)
    else:
        losses = run_steps(runner, opt, data, rank, world, micro_batches=2 if scenario == "fsdp2_accumulate" else 1)
    result = {}
    if scenario == "fsdp2_every" and folder is not None:  # every rank calls: the sharded tensors are gathered
        save_adapters(model, folder / "every-adapters")
        export_merged(model, folder / "every-merged")
        export_peft(model, folder / "every-peft", svd_rank=4, base_model=build_model())
    if scenario in ("fsdp2_every", "fsdp2_resume", "fsdp2_continue"):
        for name, layer in opt.layers.items():
            layer.merge()  # folds into the sharded weight; PEFT refuses this under FSDP
            result[f"merged/{name}"] = layer.merged_weight().detach().clone()
    result.update({f"param/{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                   for n, p in model.named_parameters()})
    result["losses"] = torch.stack(losses)
    result["modes"] = torch.tensor([list(Mode).index(m.mode) * 100 + m.rank for m in opt.layers.values()])
    result["rebuilds"] = torch.tensor(getattr(runner, "rebuilds", -1))
    result["moves"] = torch.tensor(sum(h["reason"] == "decision" for h in opt.history))
    return result


def main() -> None:
    from safetensors.torch import save_file
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for scenario in SCENARIOS:
        result = train(scenario, rank, world, out)
        save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"{scenario}.rank{rank}.safetensors"))
    torch.distributed.barrier()  # nobody tears down gloo while a peer still communicates
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
