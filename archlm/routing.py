"""The Trainer callbacks of a mixture of experts: the routing statistics of every log (`RouterStatsCallback`) and
DeepSeek-V3's auxiliary-loss-free balancing (`RouterBiasCallback`, which ArchLMTrainer adds for
`router_bias_update_rate` > 0)."""

from functools import partial

import torch
from transformers import TrainerCallback

from .modeling_archlm import ArchLMSparseMoeBlock


class _RoutedTokens(TrainerCallback):
    """Counts, per sparse block, the tokens its training forwards route to each expert (the experts the block ran),
    through forward hooks held from the start of training to its end: nothing runs inside the model's (possibly
    compiled) forward."""

    def __init__(self, blocks: list[ArchLMSparseMoeBlock]):
        self.blocks = blocks
        self.counts = [None] * len(blocks)
        self.handles = []

    def hooks(self) -> list:
        return [block.register_forward_hook(partial(self._count, index)) for index, block in enumerate(self.blocks)]

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.handles:
            self.handles = self.hooks()

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _count(self, index, block, inputs, output):
        if not block.training or torch._C._current_graph_task_id() != -1:
            return  # evaluation, or a reentrant checkpoint's recompute in the backward pass (counted in the forward)
        with torch.no_grad():
            chosen = block.choose(output[1])[1]  # router logits -> the top-k the block ran
            counts = torch.bincount(chosen.reshape(-1), minlength=block.experts.num_experts)
        self.counts[index] = counts if self.counts[index] is None else self.counts[index] + counts


class RouterStatsCallback(_RoutedTokens):
    """For a mixture of experts, each log gets `aux_loss` (the mean load-balancing loss of the steps since the previous
    log) and `expert_tokens` (per sparse layer, the tokens routed to each expert on this process) with
    `expert_imbalance` (the busiest expert's tokens over the mean, worst layer: 1.0 is perfectly balanced)."""

    def __init__(self, model):
        super().__init__([module for module in model.modules() if isinstance(module, ArchLMSparseMoeBlock)])
        self.model = model
        self.aux_losses: list[torch.Tensor] = []

    def hooks(self) -> list:
        return [*super().hooks(), self.model.register_forward_hook(self._keep_aux_loss)]

    def _keep_aux_loss(self, model, inputs, output):
        aux_loss = getattr(output, "aux_loss", None)
        if model.training and aux_loss is not None:
            self.aux_losses.append(aux_loss.detach())  # read at the log: no wait for the device at every forward

    def metrics(self) -> dict:
        """Since the previous call."""
        metrics = {}
        if self.aux_losses:
            metrics["aux_loss"] = round(torch.stack(self.aux_losses).float().mean().item(), 5)
        counts = [counts.cpu() for counts in self.counts if counts is not None]
        if counts:
            metrics["expert_tokens"] = [layer.tolist() for layer in counts]
            metrics["expert_imbalance"] = round(max((layer.max() / layer.float().mean()).item() for layer in counts), 3)
        self.counts, self.aux_losses = [None] * len(self.blocks), []
        return metrics


class RouterBiasCallback(_RoutedTokens):
    """Auxiliary-loss-free load balancing (DeepSeek-V3) for a mixture of experts with `router_bias_update_rate` > 0:
    counts the tokens each sparse block routes to each expert during an optimizer step (its gradient-accumulation
    micro-batches included), sums the counts over the processes, and after the step moves every block's routing bias
    (`update_routing_bias`). ArchLMTrainer adds it by itself; with another Trainer, pass it in `callbacks`
    (built on the ArchLM model itself, not a PEFT wrapper)."""

    def __init__(self, model):
        super().__init__([module for module in model.modules()
                          if isinstance(module, ArchLMSparseMoeBlock) and module.bias_update_rate])

    def on_step_end(self, args, state, control, **kwargs):
        if any(counts is None for counts in self.counts):  # no training forward since the last step
            self.counts = [None] * len(self.blocks)
            return
        counts = torch.stack(self.counts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every process moves the biases alike
        for block, block_counts in zip(self.blocks, counts):
            block.update_routing_bias(block_counts)
        self.counts = [None] * len(self.blocks)
