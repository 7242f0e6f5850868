"""Muon for the hidden matrices, AdamW for everything else: `--optim muon`.

Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025) replaces each hidden weight matrix's momentum by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations) before the update, so every direction of the matrix learns
at the same rate. It is meant for the 2-D matrices inside the decoder layers; embeddings, `lm_head`, norms, biases
and routers keep AdamW, as in both papers.

On a GPU the 2-D matrices use PyTorch's own `torch.optim.Muon`. It iterates in bfloat16, which CPUs without bf16
matrix units run ~100x slower than float32 (a 4-layer, 192-wide model here: 5.6 s per Muon step against 0.02 s for
AdamW), so off the GPU, and for a mixture of experts' stacked expert weights (experts, out, in), which torch's Muon
does not take, `StackedMuon` runs the same algorithm in float32, batched over any leading dimension (one expert's
matrix at a time, as torch's Muon would treat it as a parameter of its own).

One learning rate serves both groups through Moonlight's RMS matching (`adjust_lr_fn="match_rms_adamw"`): a Muon
update of a (A, B) matrix is scaled by 0.2 * sqrt(max(A, B)), which gives it the RMS of a typical AdamW update, so
`--learning_rate` and `--weight_decay` mean the same for both. The scheduler sets every group's learning rate, and
a checkpoint holds every inner optimizer's state.
"""

import math

import torch
from torch import nn

# Muon's defaults in torch.optim.Muon (Keller Jordan's quintic Newton-Schulz coefficients), shared by StackedMuon
MUON_MOMENTUM = 0.95
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalize(matrices: torch.Tensor, dtype: torch.dtype = torch.float32, steps: int = NS_STEPS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """The nearest semi-orthogonal matrix of each (..., A, B) matrix, approximately: Newton-Schulz iterations on
    the matrix scaled to spectral norm <= 1, computed in `dtype` (as torch.optim.Muon computes it for one matrix,
    in bfloat16)."""
    a, b, c = NS_COEFFICIENTS
    x = matrices.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(matrices.dtype)


def evaluate_closure(closure):
    """The loss of an optimizer's closure (which recomputes it with gradients), as torch's optimizers take it."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class StackedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, decoupled weight decay, the learning-rate rule of
    `adjust_lr_fn`) for 2-D matrices and for stacks of them (..., out, in), each matrix orthogonalised on its own,
    with the Newton-Schulz iterations in `ns_dtype`."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = MUON_MOMENTUM,
                 nesterov: bool = True, adjust_lr_fn: str | None = "match_rms_adamw",
                 ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() < 2:
                    raise ValueError(f"Muon takes matrices or stacks of them, got a parameter of shape {tuple(param.shape)}")

    @staticmethod
    def lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
        rows, columns = shape[-2:]
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, columns))
        return math.sqrt(max(1.0, rows / columns))  # Muon's original rule

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            updates: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                updates.setdefault((param.shape, param.dtype, param.device), []).append((param, update))
            # matrices of one shape are orthogonalised together, as one batch of matmuls: the same arithmetic,
            # fewer and larger kernel calls (the layers of a model repeat their shapes)
            for (shape, _, _), pairs in updates.items():
                params, stacked = [param for param, _ in pairs], torch.stack([update for _, update in pairs])
                orthogonal = orthogonalize(stacked, group["ns_dtype"])
                step_size = -lr * self.lr_ratio(shape, group["adjust_lr_fn"])
                for param, update in zip(params, orthogonal.unbind(0)):
                    param.mul_(1 - lr * group["weight_decay"])
                    param.add_(update, alpha=step_size)
        return loss


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A weight matrix of a decoder layer's attention or MLP (experts included, LoRA's factors too): not an
    embedding, the head, a norm, a bias or a router, which keep AdamW."""
    if param.dim() not in (2, 3) or "bias" in name or ".layers." not in f".{name}":
        return False
    leaf = name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1]
    return leaf not in ("gate", "shared_expert_gate")  # the router and the shared expert's gate are classifiers


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer to the Trainer (its scheduler, checkpoints and gradient clipping), up to three inside: torch's
    Muon for 2-D hidden matrices on a GPU, StackedMuon for the other hidden matrices, AdamW for the rest. Their param groups are
    this optimizer's param groups (the same dicts), so the scheduler's learning rate reaches all of them."""

    def __init__(self, named_parameters, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 no_decay: set[str] = frozenset(), momentum: float = MUON_MOMENTUM):
        matrices, stacks, decay, other = [], [], [], []
        for name, param in named_parameters:
            if not param.requires_grad:
                continue
            if is_hidden_matrix(name, param):
                (matrices if param.dim() == 2 and param.is_cuda else stacks).append(param)
            else:
                (other if name in no_decay else decay).append(param)
        if not matrices and not stacks:
            raise ValueError("--optim muon found no hidden weight matrix to train (every trainable parameter is an "
                             "embedding, head, norm or bias): use an AdamW --optim instead.")
        muon = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.optimizers = [torch.optim.Muon(matrices, **muon)] if matrices else []
        if stacks:
            self.optimizers.append(StackedMuon(stacks, **muon))
        adamw_groups = [group for group in ({"params": decay, "weight_decay": weight_decay},
                                            {"params": other, "weight_decay": 0.0}) if group["params"]]
        if adamw_groups:
            self.optimizers.append(torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps))
        groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError("This optimizer state is not one of --optim muon with the same parameter kinds: was the "
                             "checkpoint written with another --optim, or another model?")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
        # loading gives the inner optimizers new group dicts: share them again, or the scheduler's learning rates
        # would land in the old ones (accelerate's prepare() loads a state into every optimizer it wraps)
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]


def muon_optimizer(model: nn.Module, args, no_decay: set[str] = frozenset()) -> MuonWithAdamW:
    """The optimizer of `--optim muon` for `model`, from the TrainingArguments' learning rate, weight decay and
    Adam betas and epsilon."""
    return MuonWithAdamW(model.named_parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, no_decay=no_decay)
