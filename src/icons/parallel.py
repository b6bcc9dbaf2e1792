"""Data-parallel training on Lightning strategies: ``trainer=ddp`` and ``trainer=fsdp``.

Processes are started by ``torchrun`` (one node) or ``srun`` (SLURM), never by Lightning itself
(``distributed.py``): the runner joins the process group the environment names before any stage,
and Lightning finds it there.

**Global batch.** ``train.batch_size`` / ``warmup.batch_size`` are the global batch. The global
batches and their order come from the seed alone; each is cut into world x accumulate
micro-batches and every rank takes its own ``accumulate`` of them (``train.ShuffledBatches``).
So a run on W processes takes the same optimisation steps as one on a single process.

**Loss.** Each micro-batch carries its global batch's example count and answer-token count, so
its loss is exactly its share of the global batch's mean (example_mean: sum of per-example means
/ examples; token_mean: sum of token losses / tokens), with no collective: every rank knows the
whole global batch. Lightning divides a micro-batch's loss by ``accumulate`` and DDP/FSDP average
gradients over ranks, so ``LlavaModule`` multiplies by accumulate x world to undo both.

**Checkpoints.** Every rank takes part in gathering the trainable weights and Adam moments (a
collective under FSDP, full tensors on rank 0); rank 0 alone writes them.
"""
from __future__ import annotations

import torch



def is_fsdp(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def strategy(trainer_cfg, model=None):
    """The Lightning strategy for ``trainer.strategy``: FSDP gets its wrapping policy (``model``)."""
    name = getattr(trainer_cfg, "strategy", "auto")
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=wrap_policy(model), state_dict_type="full")


def wrap_policy(model):
    """FSDP units: every decoder/vision layer (``_no_split_modules``) and every leaf with trainable
    weights on its own (LoRA matrices inside the layers, the projector's linears outside them), so
    that no unit mixes frozen and trainable weights (a bf16 base with fp32 trainable weights,
    ``train.trainable_in_fp32``, cannot share one flat parameter)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    layers = set(getattr(_inner(model), "_no_split_modules", None) or ())
    chosen: set[int] = set()
    for module in model.modules():
        if type(module).__name__ not in layers:
            continue
        chosen.add(id(module))
    if {p.requires_grad for p in model.parameters()} == {True, False}:
        chosen.update(id(m) for m in model.modules() if not list(m.children())
                      and any(p.requires_grad for p in m.parameters(recurse=False)))
    return CustomPolicy(lambda m: id(m) in chosen)


def _inner(model):
    """The transformers model inside a peft wrapper."""
    base = getattr(model, "base_model", model)
    return getattr(base, "model", base)


def _full_state_context(root, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only))


def _unprefix(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key  # LlavaModule.model


def trainable_state(trainer, module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Trainable parameter name -> (weight, exp_avg, exp_avg_sq), full tensors on CPU. Every rank
    must call it (FSDP gathers); under FSDP only rank 0 gets a non-empty answer."""
    opt = trainer.optimizers[0]
    if is_fsdp(trainer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = trainer.strategy.model
        with _full_state_context(root):
            weights = {_unprefix(k): v for k, v in root.state_dict().items()}
            state = {_unprefix(k): v for k, v in FSDP.optim_state_dict(root, opt).get("state", {}).items()}
        return {n: (weights[n], state[n]["exp_avg"], state[n]["exp_avg_sq"]) for n in module.trainable if n in state}
    names = {id(p): n for n, p in module.model.named_parameters() if p.requires_grad}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            out[names[id(p)]] = tuple(t.detach().cpu().clone().contiguous() for t in (p, st["exp_avg"], st["exp_avg_sq"]))
    return out


def load_adam_state(trainer, module, adam_state: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int) -> None:
    """Resume Adam from full moments (name -> (exp_avg, exp_avg_sq)) at ``step``; under FSDP each
    rank keeps its shard of them (``module.group_index(name, n_groups)``: a parameter's group)."""
    opt = trainer.optimizers[0]
    if is_fsdp(trainer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = trainer.strategy.model
        full = {"state": {f"model.{n}": {"step": torch.tensor(float(step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
                          for n, (m, v) in adam_state.items()},
                "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                  "params": [f"model.{n}" for n in module.trainable
                                             if module.group_index(n, len(opt.param_groups)) == i]}
                                 for i, g in enumerate(opt.param_groups)]}
        with _full_state_context(root, rank0_only=False):
            opt.load_state_dict(FSDP.optim_state_dict_to_load(root, opt, full))
        return
    names = {id(p): n for n, p in module.model.named_parameters() if p.requires_grad}
    for group in opt.param_groups:
        for p in group["params"]:
            m, v = adam_state[names[id(p)]]
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.to(p.device).clone(),
                            "exp_avg_sq": v.to(p.device).clone()}


def clip_gradients(trainer, module, optimizer, value: float | None, algorithm: str | None) -> None:
    """FSDP needs its root's ``clip_grad_norm_`` (the norm over all shards); Lightning's FSDP
    precision plugin refuses norm clipping, so the module routes it here."""
    if value and is_fsdp(trainer):
        trainer.strategy.model.clip_grad_norm_(value)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


def full_model_state(trainer) -> dict[str, torch.Tensor]:
    """FSDP: the whole model's state, gathered to full tensors on rank 0 (empty elsewhere). Call it
    before Lightning's teardown moves the sharded model off its device."""
    root = trainer.strategy.model
    with _full_state_context(root):
        return {_unprefix(k): v for k, v in root.state_dict().items()}


def unshard(module, full: dict[str, torch.Tensor]) -> None:
    """After an FSDP fit: take the FSDP units out of ``module`` and, on rank 0, give every parameter
    and buffer its full tensor again, so the model saves and runs like a one-process one (the same
    Parameter objects, so tied weights stay tied). Other ranks' models are left empty."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def unwrap(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, FSDP):
                child = child.module
                setattr(parent, name, child)
            child._parameters.pop("_flat_param", None)
            unwrap(child)

    unwrap(module)
    module._parameters.pop("_flat_param", None)  # the root unit's (Lightning wraps the module itself)
    model = module.model
    with torch.no_grad():
        for name, tensor in full.items():
            owner, _, leaf = name.rpartition(".")
            sub = model.get_submodule(owner)
            if leaf in sub._parameters and sub._parameters[leaf] is not None:
                sub._parameters[leaf].data = tensor
            elif leaf in sub._buffers:
                sub._buffers[leaf] = tensor
