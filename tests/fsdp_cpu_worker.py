"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU processes over gloo, without accelerate or the Trainer.

accelerate 1.15 has no FSDP on CPU (MULTI_CPU drops the FSDP plugin), so this script does by hand what
examples/accelerate/fsdp.yaml asks for (fsdp_version 2, TRANSFORMER_BASED_WRAP, FULL_STATE_DICT): one shard unit
per module whose class is named in the model's `_no_split_modules`, then the root; a few AdamW steps; a full state
dict gathered to rank 0 and written with `save_pretrained`. tests/test_distributed.py launches it:

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 \
        tests/fsdp_cpu_worker.py --output_dir DIR [--steps 4] [--tie_word_embeddings]

Every process draws the same seeded weights and the same global batch and trains on its own 1/world_size slice
of that batch, so a run on 1 process (the whole batch) must reach the same losses: the FSDP-vs-single-process
check. Besides the model folder, rank 0 writes fsdp_log.json (world size, per-step losses, the elements each rank
held while sharded, the parameter count).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from archlm import ArchLMConfig, ArchLMForCausalLM

# Small enough to train in a second on a CPU; every dim 0 is even, so 2 processes split each parameter exactly.
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
GLOBAL_BATCH, SEQ_LEN, LEARNING_RATE = 8, 32, 1e-2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tie_word_embeddings", action="store_true", help="share lm_head with the embedding")
    return parser.parse_args()


def shard_like_accelerate(model: ArchLMForCausalLM) -> list[str]:
    """accelerate's TRANSFORMER_BASED_WRAP for FSDP2: every module whose class is named in `_no_split_modules`
    becomes its own unit (its parameters are gathered for its forward and freed after), the root last (it takes
    what is left: embeddings, final norm, lm_head). Returns the names of the units."""
    wrap = set(model._no_split_modules)
    units = [name for name, module in model.named_modules() if type(module).__name__ in wrap]
    assert units, f"no module of the classes {wrap} in the model"
    for name in units:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    return units + [""]


def local_elements(model: torch.nn.Module, world_size: int) -> int:
    """Elements this process holds. Every parameter must be a DTensor sharded on dim 0 over all processes."""
    total = 0
    for name, parameter in model.named_parameters():
        assert isinstance(parameter, DTensor), f"{name} is a {type(parameter).__name__}, not a DTensor"
        assert parameter.placements == (Shard(0),) and parameter.device_mesh.size() == world_size, name
        total += parameter.to_local().numel()
    return total


def main():
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size in (1, 2), f"world size {world_size}: the test runs 2 processes (or 1 as the reference)"
    assert GLOBAL_BATCH % world_size == 0

    # The same seed on every process: the same initial weights (fully_shard then keeps each process's slice) and
    # the same global batch. Dropout is off in the llama preset, so 1 and 2 processes compute the same function.
    torch.manual_seed(0)
    config = ArchLMConfig.from_preset("llama", **CONFIG, tie_word_embeddings=args.tie_word_embeddings)
    assert config.attention_dropout == config.hidden_dropout == config.embedding_dropout == 0
    model = ArchLMForCausalLM(config)
    parameters = model.num_parameters()  # before sharding: counts the tied matrix once
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == args.tie_word_embeddings

    units = shard_like_accelerate(model)
    assert all(isinstance(model.get_submodule(name), FSDPModule) for name in units)
    # Tied: lm_head and embed_tokens both live in the root unit, so they stay one DTensor (one shard, one gradient).
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    elements = local_elements(model, world_size)

    # One fixed global batch, reused every step: the model memorises it, so the loss falls by a clear margin per
    # step (random tokens drawn anew would leave it flat near ln(vocab)). Process r takes the r-th contiguous
    # slice, as accelerate's batch sampler does.
    batch = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    per_process = GLOBAL_BATCH // world_size
    input_ids = batch[rank * per_process:(rank + 1) * per_process]

    # Each process's loss is the mean over its slice and FSDP2 averages the gradients over processes; every row
    # has the same number of predicted tokens, so that is the gradient of the global batch's mean loss.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # gloo has no ReduceOp.AVG
        losses.append(mean.item() / world_size)

    # A collective: every process takes part; with cpu_offload only rank 0 receives the full tensors (the others
    # get an empty dict), as accelerate's FULL_STATE_DICT save does.
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    all_elements = [None] * world_size
    dist.all_gather_object(all_elements, elements)
    if rank == 0:
        assert all(not isinstance(tensor, DTensor) for tensor in state_dict.values())
        keys = len(state_dict)  # save_pretrained pops the tensors out of the dict as it writes them
        output_dir = Path(args.output_dir)
        # The model's own save_pretrained (as the Trainer's FSDP save calls it), writing the gathered tensors, not
        # the sharded parameters. It has to undo two things FSDP does: the class swap (FSDPArchLMForCausalLM) and,
        # with a tied head, the gathered lm_head.weight being a copy of the embedding instead of the same tensor.
        model.save_pretrained(output_dir, state_dict=state_dict)
        log = {
            "world_size": world_size,
            "losses": losses,
            "local_elements": all_elements,
            "parameters": parameters,
            "fsdp_units": units,
            "tied": tied,
            "state_dict_keys": keys,
        }
        (output_dir / "fsdp_log.json").write_text(json.dumps(log, indent=2))
    else:
        assert state_dict == {}, sorted(state_dict)[:5]
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
