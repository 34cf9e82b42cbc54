"""Tensor parallelism: which KV heads of the prefix each rank reads, and a prefix gradient that is whole on every
rank.

transformers shards a model over ranks with its `tp_plan` (`from_pretrained(..., tp_plan="auto")` under torchrun):
in the usual plan the q/k/v projections are `colwise` and the output projection `rowwise`, so every rank's
attention holds `Hkv / tp` whole KV heads, the rank's slice of the heads. Its prefix is the same slice of every
table, bank and per-row prefix: `HeadShards` records, once when the model is wrapped, the first KV head of each
attention's slice, read from how its `k_proj` weight is sharded (a DTensor `Shard(0)` on the tensor-parallel mesh)
and checked against the plan.

The prefix parameters stay ordinary tensors, replicated on every rank of the tensor-parallel group (made equal when
an adapter is created, by a broadcast from the group's first rank). Each rank's attention contributes the gradient
of its own heads only, so the call's tables pass through `whole_gradient`, an identity whose backward sums the
table's gradient over the group: one all-reduce per adapter and call, before the gradient reaches the parameters,
so a `prefix_projection` MLP, optimizer steps, gradient clipping and `save_pretrained` on any rank all see the full
gradient and the parameters stay equal. Replicated parameters beside this stay free for data parallelism (DDP's
average over its own group, FSDP2's sharding), and the attention op keeps taking plain tensors. The alternative, the
table as a DTensor sharded on its head axis, would make the adapter's parameters DTensors on the tensor-parallel
mesh, which every consumer (the op, saving, DDP, FSDP2's own mesh) would then have to unwrap.

Plans this understands, per attention that reads a prefix (refused otherwise, when the model is wrapped):
- sharded heads: q/k/v projections `colwise`, the output projection `rowwise`, per-head norms
  `replicated_with_grad_allreduce`; the layer's KV heads divide by the tensor-parallel size;
- replicated heads: every projection gathered or replicated (`colwise_gather_output`, `rowwise_split_input`, ...):
  every rank computes every head, and the gradient is whole already (nothing to sum).
Other mesh dimensions beside "tp" (FSDP2's shards of the same weights, which it gathers before every use) do not
change which heads a rank's attention holds.
Fused projections sharded by head (`query_key_value`/`qkv_proj` `colwise`), per-head units replicated over ranks
(`unit_colwise`), a model mixing sharded and replicated attentions, or attention weights sharded outside
transformers' plan are refused by name.
"""

import itertools
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

SHARDED = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise"}  # per projection, sharded heads
SHARDED_OTHERS = ("rowwise", "replicated_with_grad_allreduce")  # the output projection, per-head norms
REPLICATED = ("colwise_gather_output", "colwise_rep", "rowwise_split_input", "rowwise_rep", "replicate")


@dataclass(frozen=True, eq=False)
class HeadShards:
    """This rank's KV heads in every attention that reads a prefix, fixed when the model is wrapped.

    `starts` maps attention modules to the first KV head of the rank's slice; it is empty when every rank computes
    every head (replicated attentions), whose prefix gradient is whole already. `group` is the tensor-parallel
    process group.
    """

    starts: dict[nn.Module, int]
    group: dist.ProcessGroup

    def start(self, module: nn.Module) -> int:
        """The first KV head of the table that `module`'s keys hold on this rank."""
        return self.starts[module] if self.starts else 0

    def whole_gradient(self, table: torch.Tensor) -> torch.Tensor:
        """`table` itself; with sharded heads its gradient is summed over the group in the backward."""
        if not (self.starts and torch.is_grad_enabled() and table.requires_grad):
            return table
        return _SumGradient.apply(table, self.group)

    @torch.no_grad()
    def broadcast(self, module: nn.Module) -> None:
        """Make `module`'s parameters equal on every rank of the group: the group's first rank's values."""
        source = dist.get_global_rank(self.group, 0)
        for param in module.parameters():
            dist.broadcast(param.data, src=source, group=self.group)


class _SumGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # this rank's heads only (zero elsewhere)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def head_shards(model, slots: dict[nn.Module, int] | None) -> HeadShards | None:
    """The KV-head slices of `model`'s attentions under tensor parallelism (None without it). `slots` maps
    attentions to the table layer they read (None: each reads its `layer_idx`); a layer reusing another's
    keys/values (KV sharing) has that layer's slice."""
    attentions = _prefix_attentions(model, slots)
    tp_size = getattr(model, "tp_size", None) or 1
    if tp_size == 1:
        _refuse_foreign_shards(model, attentions)
        return None
    if not attentions:
        raise ValueError(f"model: found no attention module (one with a layer_idx) in {model.config.model_type}, so "
                         "the KV heads each tensor-parallel rank holds cannot be found")
    group = _tp_group(model, tp_size)
    plan = getattr(model, "tp_plan", None) or {}
    names = {module: name for name, module in model.named_modules()}
    kinds = {module: _kind(model, plan, names[module], module) for module in attentions}
    if all(kind == "replicated" for kind in kinds.values()):
        return HeadShards({}, group)
    if any(kind == "replicated" for kind in kinds.values()):
        mixed = sorted(names[m] for m, kind in kinds.items() if kind == "replicated")
        raise ValueError(f"model: {model.config.model_type}'s tensor-parallel plan shards the heads of some "
                         f"attentions and replicates others ({', '.join(mixed)}); expected one or the other for "
                         "every attention that reads a prefix")
    by_layer = {getattr(m, "layer_idx", None): m for m in attentions if hasattr(m, "k_proj")}
    starts = {}
    for module in attentions:
        source = module if hasattr(module, "k_proj") else by_layer.get(slots.get(module) if slots else None)
        if source is None:
            raise ValueError(f"model: {names[module]} has no k_proj and reuses no layer that has one, so the KV "
                             "heads its rank holds cannot be found")
        starts[module] = _kv_start(model, names[source], source, group)
    return HeadShards(starts, group)


def _tp_group(model, tp_size: int) -> dist.ProcessGroup:
    """The tensor-parallel group: the "tp" dimension of the mesh transformers sharded `model`'s weights on."""
    from torch.distributed.tensor import DTensor

    for param in model.parameters():
        if isinstance(param, DTensor) and "tp" in (param.device_mesh.mesh_dim_names or ()):
            if param.device_mesh.size(param.device_mesh.mesh_dim_names.index("tp")) == tp_size:
                return param.device_mesh.get_group("tp")
    raise ValueError(f"model: its tp_size is {tp_size}, but none of its weights is sharded on a 'tp' mesh of that "
                     "size; load it with from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))")


def _prefix_attentions(model, slots: dict[nn.Module, int] | None) -> list[nn.Module]:
    """The attention modules that read a prefix: the innermost modules that carry a `layer_idx`."""
    if slots is not None:
        return [m for m, slot in slots.items() if slot is not None]
    numbered = {m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    return [m for m in model.modules()
            if m in numbered and not any(sub in numbered for sub in itertools.islice(m.modules(), 1, None))]


def _style(plan: dict[str, str], name: str) -> str | None:
    """The plan's style for module `name` (the plan's keys number layers with `*`, as transformers does)."""
    return plan.get(re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name))


def _kind(model, plan: dict[str, str], name: str, attention: nn.Module) -> str:
    """"sharded" (whole KV heads per rank) or "replicated" (every head on every rank); refuse anything else."""
    styles = {child: style for child, _ in attention.named_children()
              if (style := _style(plan, f"{name}.{child}")) is not None}
    sharded_outside = _dtensor_params(attention, set(styles))
    if all(style in REPLICATED for style in styles.values()) and not sharded_outside:
        return "replicated"
    projections = {child: style for child, style in styles.items() if child in SHARDED}
    others = {child: style for child, style in styles.items() if child not in SHARDED}
    keys = "k_proj" in projections or not hasattr(attention, "k_proj")  # KV-sharing layers have none
    if "q_proj" in projections and keys and all(SHARDED[c] == s for c, s in projections.items()) \
            and all(s in SHARDED_OTHERS for s in others.values()) and not sharded_outside:
        return "sharded"
    outside = " and weights sharded outside the plan" if sharded_outside else ""
    raise ValueError(f"model: {model.config.model_type}'s tensor-parallel plan shards {name} as {styles}{outside}, "
                     "where prefix_kernels cannot tell which KV heads each rank holds; expected q_proj/k_proj/v_proj "
                     "'colwise' and the output projection 'rowwise' (each rank holds whole KV heads), or every "
                     "projection gathered or replicated ('colwise_gather_output', 'rowwise_split_input')")


def _dtensor_params(attention: nn.Module, planned: set[str]) -> list[str]:
    """Names of `attention`'s DTensor parameters outside the children that the plan names."""
    from torch.distributed.tensor import DTensor

    return [name for name, p in attention.named_parameters()
            if isinstance(p, DTensor) and name.split(".", 1)[0] not in planned]


def _kv_start(model, name: str, attention: nn.Module, group: dist.ProcessGroup) -> int:
    """The first KV head of this rank's slice, from how the `k_proj` weight is sharded over `group`."""
    from torch.distributed.tensor import DTensor, Shard

    weight, tp_size = attention.k_proj.weight, dist.get_world_size(group)
    if not isinstance(weight, DTensor):
        raise ValueError(f"model: {name}.k_proj is 'colwise' in {model.config.model_type}'s tensor-parallel plan "
                         "but its weight is not sharded (not a DTensor)")
    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    dim = names.index("tp") if "tp" in names else 0 if mesh.ndim == 1 else None
    if dim is None or weight.placements[dim] != Shard(0) \
            or dist.get_process_group_ranks(mesh.get_group(dim)) != dist.get_process_group_ranks(group):
        raise ValueError(f"model: {name}.k_proj's weight is placed {tuple(weight.placements)} on {mesh}; expected "
                         f"Shard(dim=0) on the tensor-parallel mesh of ranks {dist.get_process_group_ranks(group)}")
    head_dim, rows = getattr(attention, "head_dim", None), weight.shape[0]
    if not isinstance(head_dim, int) or rows % head_dim or rows // head_dim % tp_size:
        raise ValueError(f"model: {model.config.model_type}'s tensor-parallel plan shards {name}.k_proj "
                         f"'colwise', but its {rows} rows hold {rows // head_dim if isinstance(head_dim, int) else '?'}"
                         f" KV heads (head_dim {head_dim}), which {tp_size} ranks cannot split into whole heads; "
                         f"expected a multiple of {tp_size} KV heads")
    return mesh.get_local_rank(dim) * (rows // head_dim // tp_size)


def _refuse_foreign_shards(model, attentions: list[nn.Module]) -> None:
    """Without transformers' tensor parallelism, attention weights may be DTensors only as FSDP2 shards them (it
    gathers them before every use); any other sharding (torch's own `parallelize_module`) is refused."""
    if not dist.is_available():
        return
    sharded = [attention for attention in attentions if _dtensor_params(attention, set())]
    if not sharded:
        return
    from torch.distributed.fsdp import FSDPModule

    gathered = {sub for m in model.modules() if isinstance(m, FSDPModule) for sub in m.modules()}
    names = {module: name for name, module in model.named_modules()}
    for attention in sharded:
        if attention not in gathered:
            raise ValueError(f"model: {names[attention]}'s weights are DTensors, sharded outside transformers' "
                             f"tp_plan, so the KV heads each rank holds are unknown; load {model.config.model_type} "
                             "with from_pretrained(..., distributed_config=DistributedConfig(tp_size=N)) under "
                             "torchrun instead")
