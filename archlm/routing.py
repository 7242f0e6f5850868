"""The Trainer callbacks of a mixture of experts: the routing statistics of every log (`RouterStatsCallback`) and
DeepSeek-V3's auxiliary-loss-free balancing (`RouterBiasCallback`, which ArchLMTrainer adds for
`router_bias_update_rate` > 0)."""

from functools import partial

import torch
from transformers import TrainerCallback

from .modeling_archlm import ArchLMSparseMoeBlock


class RouterStatsCallback(TrainerCallback):
    """For a mixture of experts, each log gets `aux_loss` (the mean load-balancing loss of the steps since the previous
    log) and `expert_tokens` (per sparse layer, the tokens routed to each expert on this process) with
    `expert_imbalance` (the busiest expert's tokens over the mean, worst layer: 1.0 is perfectly balanced)."""

    def __init__(self, model):
        self.model = model
        self.blocks = [module for module in model.modules() if isinstance(module, ArchLMSparseMoeBlock)]
        self.counts = [None] * len(self.blocks)
        self.aux_losses: list[float] = []
        self.handles = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.handles:
            return
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(partial(self._count_routed, index)))
        self.handles.append(self.model.register_forward_hook(self._keep_aux_loss))

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _count_routed(self, index, block, inputs, output):
        if not block.training:
            return
        chosen = block.choose(output[1])[1]  # the experts the block ran (router logits -> top-k)
        counts = torch.bincount(chosen.reshape(-1), minlength=block.experts.num_experts).cpu()
        self.counts[index] = counts if self.counts[index] is None else self.counts[index] + counts

    def _keep_aux_loss(self, model, inputs, output):
        aux_loss = getattr(output, "aux_loss", None)
        if model.training and aux_loss is not None:
            self.aux_losses.append(aux_loss.item())

    def metrics(self) -> dict:
        """Since the previous call."""
        metrics = {}
        if self.aux_losses:
            metrics["aux_loss"] = round(sum(self.aux_losses) / len(self.aux_losses), 5)
        counts = [counts for counts in self.counts if counts is not None]
        if counts:
            metrics["expert_tokens"] = [layer.tolist() for layer in counts]
            metrics["expert_imbalance"] = round(max((layer.max() / layer.float().mean()).item() for layer in counts), 3)
        self.counts, self.aux_losses = [None] * len(self.blocks), []
        return metrics


class RouterBiasCallback(TrainerCallback):
    """Auxiliary-loss-free load balancing (DeepSeek-V3) for a mixture of experts with `router_bias_update_rate` > 0:
    counts the tokens each sparse block routes to each expert during an optimizer step (its gradient-accumulation
    micro-batches included), sums the counts over the processes, and after the step moves every block's routing bias
    (`update_routing_bias`). ArchLMTrainer adds it by itself; with another Trainer, pass it in `callbacks`
    (built on the ArchLM model itself, not a PEFT wrapper).

    The counts come from forward hooks, so nothing runs inside the model's (possibly compiled) forward. Gradient
    checkpointing runs a block's forward twice per micro-batch: every count doubles, and the update, which reads
    only each expert's side of the mean, is unchanged."""

    def __init__(self, model):
        self.blocks = [module for module in model.modules()
                       if isinstance(module, ArchLMSparseMoeBlock) and module.bias_update_rate]
        self.counts = [None] * len(self.blocks)
        self.handles = []

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.handles:
            self.handles = [block.register_forward_hook(partial(self._count, index))
                            for index, block in enumerate(self.blocks)]

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _count(self, index, block, inputs, output):
        if not block.training:
            return
        with torch.no_grad():
            chosen = block.choose(output[1])[1].reshape(-1)
            counts = torch.zeros(block.experts.num_experts, device=chosen.device).index_add_(
                0, chosen, torch.ones_like(chosen, dtype=torch.float32))
        self.counts[index] = counts if self.counts[index] is None else self.counts[index] + counts

    def on_step_end(self, args, state, control, **kwargs):
        present = [counts is not None for counts in self.counts]
        if not any(present):
            return
        counts = torch.stack([counts if counts is not None else torch.zeros(block.experts.num_experts,
                                                                                  device=block.gate.weight.device)
                              for counts, block in zip(self.counts, self.blocks)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every process moves the biases alike
        for block, block_counts, counted in zip(self.blocks, counts, present):
            if counted:
                block.update_routing_bias(block_counts)
        self.counts = [None] * len(self.blocks)
