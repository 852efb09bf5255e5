"""The policy on Megatron-Core: per-token statistics passes and PPO-style updates.

Runs through megatron-core's own forward/backward schedule (so pipeline parallelism uses its 1F1B
schedule), megatron DDP and megatron's optimizer. Every rank of a TP/PP group receives the same
micro-batches; the statistics and the loss live on the last pipeline stage.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.distributed as dist

from steer_megatron.loss.rollout_correction import keep_mask
from steer_megatron.loss import (
    PolicyLossConfig,
    PolicyLossInputs,
    TokenStats,
    fused_linear_token_stats,
    get_policy_loss,
    token_stats,
)


@dataclass
class ActorBatch:
    """One rollout batch in next-token layout: position t predicts input_ids[:, t + 1].

    input_ids [B, L] right-padded (megatron's RoPE ignores position ids, so no left padding);
    every other tensor is [B, L - 1]. loss_mask is True on response tokens.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_log_prob: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    rollout_log_prob: torch.Tensor | None = None
    ref_log_prob: torch.Tensor | None = None
    rewards: torch.Tensor | None = None  # each sequence's reward on its response tokens (GTPO's estimator)

    def __post_init__(self):
        b, length = self.input_ids.shape
        for f in fields(self)[1:]:
            t = getattr(self, f.name)
            if t is not None and tuple(t.shape) != (b, length - 1):
                raise ValueError(f"ActorBatch.{f.name} has shape {tuple(t.shape)}, expected {(b, length - 1)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def dp_slice(self, rank: int, dp: int) -> "ActorBatch":
        """This data-parallel rank's equal share (rows past dp * (len // dp) are left out)."""
        per = len(self) // dp
        return self.slice(rank * per, (rank + 1) * per)

    def slice(self, start: int, stop: int) -> "ActorBatch":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[start:stop])
                                for f in fields(self)})

    def padded(self, rows: int) -> "ActorBatch":
        """`rows` more rows, copies of the first with loss_mask False: they add nothing to any loss or statistic."""
        def grow(t):
            return None if t is None else torch.cat([t, t[:1].expand(rows, *t.shape[1:])])

        out = replace(self, **{f.name: grow(getattr(self, f.name)) for f in fields(self)})
        out.loss_mask[len(self):] = False
        return out


@dataclass(frozen=True)
class ActorConfig:
    vocab_size: int  # the tokenizer's real vocabulary; padded logit columns are masked
    micro_batch_size: int = 4
    mini_batch_size: int = 32  # sequences per optimizer step
    ppo_epochs: int = 1
    policy_loss: str = "steer"
    loss: PolicyLossConfig = PolicyLossConfig()
    chunk_tokens: int | None = None
    loss_kernel: str = "auto"  # auto | torch | triton (steer_megatron.loss.kernels)
    fused_lm_head: bool = False  # statistics from hidden states x output weight; logits never whole
    # Multiplies the scheduler's LR at every optimizer step. 1 except under the entropy closed loop
    # (diagnostics.closed_loop.lr_scale_bounds), which sets it per RL step: Adam and gradient
    # clipping renormalise any scale put on the loss, but not one put on the LR.
    lr_scale: float = 1.0

    def __post_init__(self):
        if not self.lr_scale > 0:
            raise ValueError(f"ActorConfig.lr_scale={self.lr_scale} must be > 0")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        get_policy_loss(self.policy_loss)  # unknown names fail at start-up


@contextmanager
def _scaled_lr(optimizer, scale: float):
    """The optimizer's param-group LRs times `scale` for one step; the scheduler's values come back after."""
    groups = optimizer.param_groups if scale != 1.0 else []
    saved = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = g["lr"] * scale
    try:
        yield
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr


def _is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)


class _HiddenStatesTap:
    """Forward pre-hook on megatron's output layer (algorithm.fused_lm_head): keeps the final-norm
    hidden states [s, b, H] and the weight the layer would multiply them by (GPTModel passes the
    shared embedding when embeddings are tied, else the layer uses its own), and hands the layer a
    zero-length sequence, so the [s, b, V_local] logits are never computed. Uses torch's public
    hook API on our model instance; megatron's code is unchanged."""

    def __init__(self):
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module, args, kwargs):
        weight = kwargs.get("weight")
        self.kept = (args[0], module.weight if weight is None else weight)
        return (args[0][:0],) + tuple(args[1:]), kwargs

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, output weight) of the micro-batch that just ran forward."""
        kept, self.kept = self.kept, None
        if kept is None:
            raise RuntimeError("fused_lm_head: the output layer did not run before the loss")
        return kept


class MegatronActor:
    def __init__(self, model: torch.nn.Module, optimizer, cfg: ActorConfig, scheduler=None):
        self.model, self.optimizer, self.cfg, self.scheduler = model, optimizer, cfg, scheduler
        self.loss_fn = get_policy_loss(cfg.policy_loss)
        self._tap = None
        if cfg.fused_lm_head and _is_last_stage():
            from steer_megatron.models.hf_import import unwrap

            gpt = unwrap(model)
            if gpt.output_layer.sequence_parallel:
                raise ValueError("fused_lm_head does not support sequence parallelism yet; set parallel.sequence_parallel=false")
            self._tap = _HiddenStatesTap()
            gpt.output_layer.register_forward_pre_hook(self._tap, with_kwargs=True)

    # -- statistics ---------------------------------------------------------------------------
    def micro_batch_stats(self, output: torch.Tensor, mb: ActorBatch, p2_stats: bool) -> TokenStats:
        """Token statistics of a micro-batch from the model's output: logits [b, s, V_local], or
        with fused_lm_head the hidden states kept by the output layer's hook."""
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        target = mb.input_ids[:, 1:]
        if self._tap is None:
            return token_stats(output[:, :-1], target, vocab_size=self.cfg.vocab_size, tp_group=tp_group,
                               chunk_tokens=self.cfg.chunk_tokens, p2_stats=p2_stats, kernel=self.cfg.loss_kernel)
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        hidden, weight = self._tap.take()
        hidden = hidden.transpose(0, 1)[:, :-1]  # [s, b, H] -> [b, s - 1, H]
        # what ColumnParallelLinear does to its input: identity forward, grad all-reduced over TP
        # (each rank's fused backward holds only its vocab shard's part of d loss / d hidden)
        hidden = copy_to_tensor_model_parallel_region(hidden)
        return fused_linear_token_stats(hidden, weight, target, vocab_size=self.cfg.vocab_size, tp_group=tp_group,
                                        kernel=self.cfg.loss_kernel, p2_stats=p2_stats)

    def run_schedule(self, batch: ActorBatch, loss_func, forward_only: bool):
        """megatron's forward/backward schedule over micro-batches of `batch`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron.core import parallel_state as ps

        mbs = self.cfg.micro_batch_size
        if len(batch) % mbs and ps.get_pipeline_model_parallel_world_size() > 1:
            # pipeline stages exchange activations of one fixed [seq, mbs, hidden] shape, so a short
            # last micro-batch (the parity probe's few prompts, a diagnostics slice) is filled up
            batch = batch.padded(mbs - len(batch) % mbs)
        micro = [batch.slice(i, i + mbs) for i in range(0, len(batch), mbs)]
        seq = batch.input_ids.shape[1]

        def forward_step(data_iter, model):
            mb = next(data_iter)
            pos = torch.arange(seq, device=mb.input_ids.device)[None].expand_as(mb.input_ids)
            return model(mb.input_ids, pos, None), partial(loss_func, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[self.model],
            num_microbatches=len(micro), seq_length=seq, micro_batch_size=mbs, forward_only=forward_only,
        )

    @torch.no_grad()
    def compute_log_probs(self, batch: ActorBatch, *, p2_stats: bool = False):
        """(log_prob, entropy) [B, L-1] of the current weights on the last stage, None elsewhere."""
        self.model.eval()

        def loss_func(mb, logits):
            st = self.micro_batch_stats(logits, mb, p2_stats)
            return logits.new_zeros(()), {"logprob": st.logprob, "entropy": st.entropy}

        out = self.run_schedule(batch, loss_func, forward_only=True)
        self.model.train()
        if not _is_last_stage():
            return None, None
        n = len(batch)  # without the rows run_schedule may have added
        return torch.cat([o["logprob"] for o in out])[:n], torch.cat([o["entropy"] for o in out])[:n]

    # -- update -------------------------------------------------------------------------------
    def _global_tokens(self, mini: ActorBatch) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        n = mini.loss_mask.sum().to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(n, group=ps.get_data_parallel_group())
        return n

    def update(self, batch: ActorBatch) -> dict[str, float]:
        """ppo_epochs passes over mini-batches; one optimizer step per mini-batch. Returns mean metrics."""
        from megatron.core import parallel_state as ps

        if _is_last_stage() and (batch.advantages is None or batch.old_log_prob is None):
            raise ValueError("update() needs advantages and old_log_prob (run compute_log_probs first)")
        cfg = self.cfg
        if cfg.loss.correction.drops_tokens and batch.old_log_prob is not None:
            # masked IS drops tokens before the token count of each mini-batch is taken (the loss drops them again)
            batch = replace(batch, loss_mask=keep_mask(batch.old_log_prob, batch.rollout_log_prob, batch.loss_mask,
                                                       cfg.loss.correction))
        form = cfg.loss.steer.form if cfg.policy_loss == "steer" else None
        dp = ps.get_data_parallel_world_size()
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        for _ in range(cfg.ppo_epochs):
            for start in range(0, len(batch), cfg.mini_batch_size):
                mini = batch.slice(start, start + cfg.mini_batch_size)
                n_micro = -(-len(mini) // cfg.micro_batch_size)
                token_mean = cfg.loss.loss_agg_mode == "token-mean"
                # token-mean over the whole mini-batch on every DP rank: the schedule divides by the
                # number of micro-batches and DDP averages over DP, so undo both.
                normalizer = self._global_tokens(mini) if token_mean else None
                scale = n_micro * dp if token_mean else 1

                def loss_func(mb, logits):
                    st = self.micro_batch_stats(logits, mb, p2_stats=form == "exact")
                    inp = PolicyLossInputs(
                        log_prob=st.logprob, old_log_prob=mb.old_log_prob, advantages=mb.advantages,
                        mask=mb.loss_mask, entropy=st.entropy, old_entropy=mb.old_entropy,
                        sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp, ref_log_prob=mb.ref_log_prob,
                        rollout_log_prob=mb.rollout_log_prob, token_normalizer=normalizer,
                        dp_group=ps.get_data_parallel_group(),
                    )
                    loss, metrics = self.loss_fn(inp, cfg.loss)
                    metrics["loss"] = loss.detach().clone()
                    return loss * scale, metrics

                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()
                out = self.run_schedule(mini, loss_func, forward_only=False)
                with _scaled_lr(self.optimizer, cfg.lr_scale):
                    ok, grad_norm, _ = self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step(increment=1)
                if _is_last_stage():
                    for o in out:
                        for k, v in o.items():
                            sums[k] = sums.get(k, 0.0) + float(v)
                    count += len(out)
                grad_norms.append(float(grad_norm or 0.0))
                if not ok:
                    raise FloatingPointError("optimizer step skipped: non-finite gradients (lower the LR or check the data)")
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        return metrics
