"""Sharded data-parallel training (train.fsdp): torch's FSDP2 (`fully_shard`) through the
transformers Trainer and accelerate, each transformer block its own shard unit. Weights,
gradients and optimizer state are split across the train.num_processes * train.num_nodes
processes; a block's full weights exist only while it computes.

accelerate turns FSDP on only for accelerator devices (its state stays MULTI_CPU on a CPU
even with an FSDP plugin), though torch's FSDP2 shards over gloo just as over NCCL.
`sharded_trainer` switches the state on a CPU the way accelerate itself does on a GPU, so
the same code path (fully_shard, sharded checkpoints, the gathered save) runs on a CPU-only
host; the tests run it with two gloo processes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tasks.config import Params
from tasks.errors import PipelineError

log = logging.getLogger("finetune.train")

# The Trainer's FSDP settings: FSDP2, every transformer block (the model's _no_split_modules)
# wrapped, parameters resharded after each block's forward; checkpoints saved as each
# process's shard (distributed checkpoint), as a resumed run loads them.
FSDP_CONFIG = {"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}


def fsdp_arguments(params: Params) -> dict[str, Any]:
    """TrainingArguments' FSDP fields for params (none without train.fsdp)."""
    if not params.train.fsdp:
        return {}
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": dict(FSDP_CONFIG)}


def sharded_trainer(trainer_class: type) -> type:
    """trainer_class that runs FSDP on a CPU too (see the module's docstring)."""

    class Sharded(trainer_class):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            if self.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
                return
            # What AcceleratorState sets for FSDP on a GPU, both states included: an
            # AcceleratorState made later copies PartialState's type.
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call)
            if self.is_fsdp_enabled:
                # With sharded checkpoints the Trainer writes nothing here (the shards come
                # with the optimizer's state, later), yet right after this it remembers the best
                # checkpoint only if its folder exists: without it, a process that looked
                # before another created the folder forgot the best checkpoint, and at the end
                # the processes disagreed on loading it and waited for each other forever.
                os.makedirs(output_dir or self.args.output_dir, exist_ok=True)

    Sharded.__name__ = Sharded.__qualname__ = f"Sharded{trainer_class.__name__}"
    return Sharded


def full_state_dict(trainer, every_node: bool = False) -> dict[str, Any] | None:
    """The trained model's whole state dict, gathered from every process's shard onto the
    CPU of the first process, or with `every_node` of each node's first process (node-local
    storage: each node writes the outputs into its own checkout). Every process must call
    this; the others get an empty dict. None without FSDP, where each process holds the
    whole model already."""
    if not trainer.is_fsdp_enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    shards = [w for w in trainer.model.parameters() if isinstance(w, DTensor)]
    if not shards:  # accelerate changed how it decides, and the run was plain data parallel
        raise PipelineError("train.fsdp is true but the Trainer did not shard the model (no "
                            "parameter is a DTensor): report this with your accelerate version")
    log.info("gathering the model from %d shards (FSDP, %d of %d parameters sharded)",
             trainer.args.world_size, len(shards), len(list(trainer.model.parameters())))
    if every_node:
        # One tensor at a time, so a process that does not write holds one whole tensor at most.
        keep = trainer.is_local_process_zero()
        state = {}
        for name, value in get_model_state_dict(trainer.model).items():
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            if keep:
                state[name] = whole.cpu()
    else:
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (an output head sharing the input embeddings) come back as two copies;
    # as one tensor under both names, save_pretrained writes them once, as without FSDP.
    names: dict[int, list[str]] = {}
    for name, weight in trainer.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(weight), []).append(name)
    for first, *tied in names.values():
        for name in tied:
            if first in state:
                state[name] = state[first]
    writes = trainer.is_local_process_zero() if every_node else trainer.is_world_process_zero()
    if writes and not state:  # an empty adapter must never be written as the result
        raise PipelineError("gathering the sharded model gave the process that writes it nothing")
    return state
