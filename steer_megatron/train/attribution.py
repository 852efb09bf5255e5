"""Each token's first-order contribution to the change of the batch's summed entropy (steer.form=attribution).

A step delta_theta = lr * P * (1/N) * sum_j A_j r_j grad log p_j (token-mean PPO surrogate, clipped
tokens 0, P the optimizer's diagonal preconditioner) changes H_total = sum_i H_i over the batch's
response tokens by g_H . delta_theta to first order, g_H = grad_theta H_total. Regrouped per token:

    dH_total_j = lr * A_j * r_j * D_j / N,   D_j = grad log p_j . P g_H = d/d eps log p_j(theta + eps P g_H) at 0.

So one backward of H_total (g_H, all-reduced over DP by the schedule like any gradient) and one
forward at theta + eps P g_H (a forward finite difference) give every D_j. The perturbation is
applied to the optimizer's own fp32 parameters (the model's parameters, or the distributed
optimizer's shards where they live), each saved first and copied back bit for bit; model
parameters in bf16 cannot resolve eps P g_H and are refused. Extra memory: one copy of the
optimizer's parameters (1 / DP of the weights under the distributed optimizer) while the
perturbed forward runs, P g_H one tensor at a time, and the gradient buffer the update uses anyway.

Collective: every rank of the model calls it together. Values live on the last pipeline stage.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# Largest per-parameter change of the finite-difference perturbation, relative to the largest
# |weight| (both taken over every rank). Small enough for the forward difference's O(eps) error,
# large enough that the log-prob change stands well above fp32 rounding (README "STEER forms").
FD_REL_STEP = 1e-4
# Adam's denominators are floored at this fraction of the largest one (over every rank). Weights
# the past steps never moved (v = 0: embedding rows of tokens not seen yet) would otherwise get
# P = 1 / adam_eps ~ 1e8 and set P g_H's direction alone; the real step bounds them through the
# current gradient (v picks up (1 - beta2) g^2 first), which is not known before the step.
ADAM_DENOM_FLOOR = 1e-3


def _subs(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def check_supported(model: torch.nn.Module) -> None:
    """Refuse model weights a small perturbation cannot move (bf16 / fp16)."""
    bad = {str(p.dtype) for p in model.parameters() if p.dtype != torch.float32}
    if bad:
        raise ValueError(f"steer.form=attribution perturbs the weights by a small step along P g_H; model parameters "
                         f"in {sorted(bad)} round that step away (bf16 keeps 8 bits of mantissa): train with fp32 "
                         "parameters (model.dtype=float32, optim bf16 off) or use another steer.form")


def adam_root(opt: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(sqrt(v_hat), eps) of Adam's current (pre-step) state for p; None for SGD or before Adam's first step."""
    state = opt.state.get(p, {})
    if "exp_avg_sq" not in state or float(state["step"]) <= 0:
        return None
    group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
    bc2 = 1 - group["betas"][1] ** float(state["step"])
    return (state["exp_avg_sq"].float() / bc2).sqrt(), group["eps"]


def preconditioned(opt: torch.optim.Optimizer, p: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """P * p.grad for one optimizer parameter: Adam's 1 / (max(sqrt(v_hat), floor) + eps) from the
    current second moment, identity when Adam has no statistics yet or for SGD."""
    root = adam_root(opt, p)
    if root is None:
        return p.grad.float()
    r, eps = root
    return p.grad.float() / (r.clamp(min=floor) + eps)


def _world_max(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _sync_model_from_optimizer(optimizer, model) -> None:
    """After editing the optimizer's parameters: copy them into the model parameters where they
    are separate tensors, and all-gather the distributed optimizer's shards."""
    from megatron.core.optimizer.optimizer import FP32Optimizer

    for sub in _subs(optimizer):
        if isinstance(sub, FP32Optimizer):
            continue  # its parameters are the model's
        sub._copy_main_params_to_model_params()
        if getattr(sub, "ddp_config", None) is not None and sub.ddp_config.use_distributed_optimizer:
            for chunk in sub.model_chunks:
                chunk.start_param_sync(force_sync=True)


def entropy_attribution(actor, mini, normalizer: torch.Tensor | float | None) -> tuple[torch.Tensor, dict] | None:
    """(A r D / N per token [B, L-1], 0 off the mask; stats) at the current weights, per unit LR;
    None off the last pipeline stage. normalizer: N, the token-mean's global token count.
    Leaves weights, optimizer state and gradient buffers as they were (gradients zeroed)."""
    from megatron.core import parallel_state as ps

    from steer_megatron.train.actor import _is_last_stage

    model, optimizer = actor.model, actor.optimizer
    check_supported(model)
    dp = ps.get_data_parallel_world_size()
    micro, _ = actor.micro_batches(mini)  # as the update cuts it (token budgets, packing)
    n_micro = len(micro)

    # 1. g_H: backward of the summed response-token entropy (the schedule divides by the number of
    #    micro-batches and DDP averages over DP: undo both, as the token-mean update does).
    def loss_func(mb, output):
        st = actor.micro_batch_stats(output, mb, p2_stats=False)
        h = (st.entropy * mb.loss_mask).sum()
        return h * (n_micro * dp), {"logprob": st.logprob.detach()}

    model.zero_grad_buffer()
    optimizer.zero_grad()
    model.eval()  # the perturbed pass runs in eval mode too: one function of the weights
    try:
        out = actor.run_schedule(mini, loss_func, forward_only=False, micro=micro)
    finally:
        model.train()
    optimizer.prepare_grads()  # model grads -> the optimizer's parameters (shards under the distributed optimizer)

    # 2. v = P g_H where the optimizer's parameters live; eps from the largest |v| and |theta| anywhere.
    pairs = [(opt, p) for sub in _subs(optimizer) for opt in [sub.optimizer]
             for gr in opt.param_groups for p in gr["params"] if p.grad is not None]
    device = pairs[0][1].device if pairs else torch.device("cpu")
    roots = (adam_root(opt, p) for opt, p in pairs if p.numel())  # a generator: one tensor at a time
    r_max = _world_max(max((float(r[0].max()) for r in roots if r is not None), default=0.0), device)
    floor = ADAM_DENOM_FLOOR * r_max
    # P g_H one tensor at a time (twice: its max sets eps, then the step): never a whole second copy
    v_max = _world_max(max((float(preconditioned(opt, p, floor).abs().max()) for opt, p in pairs if p.numel()),
                           default=0.0), device)
    w_max = _world_max(max((float(p.detach().abs().max()) for _, p in pairs if p.numel()), default=0.0), device)
    eps = FD_REL_STEP * w_max / v_max if v_max > 0 else 0.0

    logp_pert = None
    if eps > 0:
        saved = [p.detach().clone() for _, p in pairs]
        try:
            with torch.no_grad():
                for opt, p in pairs:
                    p.add_(preconditioned(opt, p, floor).to(p.dtype), alpha=eps)
            _sync_model_from_optimizer(optimizer, model)
            st = actor.token_statistics(mini, False)
            logp_pert = None if st is None else st["logprob"]
        finally:
            with torch.no_grad():
                for (_, p), s in zip(pairs, saved):
                    p.copy_(s)
            _sync_model_from_optimizer(optimizer, model)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    if not _is_last_stage():
        return None
    n, t = len(mini), mini.input_ids.shape[1] - 1
    logp = torch.cat([o["logprob"] for o in out])[:n, :t]
    mask = mini.loss_mask.bool()
    d = torch.zeros_like(logp) if logp_pert is None else (logp_pert.float() - logp.float()) / eps
    ratio = (logp.float() - mini.old_log_prob.float()).exp()
    norm = 1.0 if normalizer is None else float(normalizer)
    attr = torch.where(mask, mini.advantages.float() * ratio * d / norm, torch.zeros_like(d))
    return attr, {"attr_eps": eps, "attr_sum": float(attr.sum()), "adam_denom_floor": ADAM_DENOM_FLOOR * r_max}
