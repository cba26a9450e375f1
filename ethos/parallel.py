"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`), on GPUs (NCCL) and on CPU (gloo).

`trainer=fsdp` selects `FSDP`, Lightning's ModelParallelStrategy with every process on the data-parallel axis
(no tensor parallelism); `Task.configure_model` then calls `shard`. Lightning's older FSDPStrategy wraps FSDP1,
which refuses a CPU, so it is not used.

Data are those of `trainer=ddp`: each process gets data.batch_size samples of every global batch, so a run gives
the same weights on any world size. Checkpoints are one consolidated file (rank 0 gathers the full state) in
exactly the format one process writes, AdamW state keyed the way `torch.optim.Optimizer.state_dict` keys it (by
position across the parameter groups). Lightning's own FSDP checkpoints key it by position in
`module.parameters()`, which another strategy would load onto the wrong parameters; with ours a run resumes
under DDP, FSDP or one process alike, on any world size.
"""

from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ethos import checkpoint


class FSDP(ModelParallelStrategy):
    """Every process shards the model; the world size is known only once the processes exist."""

    def __init__(self, **kwargs):
        kwargs.setdefault("save_distributed_checkpoint", False)  # last.ckpt stays one file, any strategy reads it
        super().__init__(data_parallel_size=1, tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # = the world size
        super().setup_environment()

    def _names(self, optimizer) -> list[str]:
        """Parameter names in the optimizer's order: position i is the id torch's Optimizer.state_dict uses."""
        name = {id(p): n for n, p in self.model.named_parameters()}
        return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def optimizer_state(self, optimizer) -> dict:
        # torch.distributed's modules: only under trainer=fsdp (torch builds without distributed lack them)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        # collective: every rank gathers its shards, rank 0 receives the full state (keyed by parameter name)
        full = get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return {}
        pos = {n: i for i, n in enumerate(self._names(optimizer))}
        return {"state": {pos[n]: v for n, v in full["state"].items()},
                "param_groups": [{**g, "params": [pos[n] for n in g["params"]]} for g in full["param_groups"]]}

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        from torch.distributed.checkpoint.state_dict import (  # see optimizer_state
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        ckpt = checkpoint.load(path, key="ckpt_path", mmap=True)  # weights only, whatever Lightning asks for
        options = StateDictOptions(full_state_dict=True, strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, ckpt.pop("state_dict"), options=options)  # each rank keeps its shards
        for optimizer, saved in zip(self.optimizers, ckpt.get("optimizer_states", [])):
            names = self._names(optimizer)
            by_name = {"state": {names[i]: v for i, v in saved["state"].items()},
                       "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                        for g in saved["param_groups"]]}
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name, options=options)
        return ckpt  # loops, callbacks, schedulers: restored by Lightning as for any strategy


def shard(model: nn.Module, mesh) -> None:
    """One FSDP unit per transformer block, then the rest (embeddings, heads, final norm) in the root unit, as
    torchtitan does: each block's parameters are gathered just before it runs and freed after. Idempotent
    (Lightning calls configure_model for validate and again for fit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard  # see FSDP.optimizer_state

    if isinstance(model, FSDPModule):
        return
    for block in model.trunk.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
