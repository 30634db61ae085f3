"""The only place that knows about activation checkpointing, torch.compile and FSDP2 for training.

Order (torchtitan): activation checkpointing -> per-block compile -> per-block fully_shard -> root fully_shard.
All of it wraps a built model from outside; the model code never changes.
"""

from __future__ import annotations

from torch import nn


def parallelize(model: nn.Module, cfg, world_size: int, precision=None) -> nn.Module:
    """`precision`: the run's train.precision.Precision (its FSDP2 mixed-precision policy); None = fp32."""
    blocks = [*model.double_blocks, *model.single_blocks]
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        # The wrapper's state-dict hooks strip its `_checkpoint_wrapped_module.` prefix, so keys stay BFL keys.
        for blocks_list in (model.double_blocks, model.single_blocks):
            for i, block in enumerate(blocks_list):
                blocks_list[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        blocks = [*model.double_blocks, *model.single_blocks]
    if cfg.compile:
        import torch._dynamo

        # A graph that fails to compile runs eagerly (with dynamo's warning) instead of ending a long run.
        torch._dynamo.config.suppress_errors = True
        for block in blocks:
            block.compile()  # in place: parameter names are unchanged
    if cfg.fsdp and world_size > 1:
        from torch.distributed.fsdp import fully_shard

        # fp32 master weights; the policy's compute dtype with fp32 gradient reduction (CPU/gloo: fp32).
        if precision is None:
            from fluxion.train.precision import precision_policy

            device = next(model.parameters()).device
            precision = precision_policy(getattr(cfg, "compute_dtype", "bfloat16"), device)
        mp = precision.fsdp_mixed_precision()
        kwargs = {"mp_policy": mp} if mp else {}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    elif world_size > 1:
        raise ValueError("several processes need fsdp=True (plain data parallel is not offered)")
    return model
