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
    old_policy_omega_range,
    token_stats,
)
from steer_megatron.train.balance import balanced_order, row_lengths

TOKEN_MEAN_OVER = ("mini_batch", "micro_batch")


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
    # the old-log-prob pass's sum p^2 / sum p^2 log p: STEER exact with steer.group=mini_batch only
    old_sum_p2: torch.Tensor | None = None
    old_sum_p2_logp: torch.Tensor | None = None
    rewards: torch.Tensor | None = None  # each sequence's reward on its response tokens (GTPO's estimator)
    # STEER attribution: dH_total_j per unit LR, filled per mini-batch by update() (train/attribution.py)
    steer_attribution: torch.Tensor | None = None

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

    def lengthened(self, length: int) -> "ActorBatch":
        """Right-padded to `length` tokens (masked out): sequence parallelism splits the sequence
        evenly over the TP ranks, so its length must be a multiple of TP."""
        extra = length - self.input_ids.shape[1]
        if extra <= 0:
            return self

        def grow(t):
            return None if t is None else torch.cat([t, t.new_zeros(t.shape[0], extra)], 1)

        return replace(self, **{f.name: grow(getattr(self, f.name)) for f in fields(self)})

    def take(self, order: torch.Tensor) -> "ActorBatch":
        """The rows in `order` (a permutation or selection of row indices)."""
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[order])
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
    # The sampling temperature: log-probs and entropies are those of softmax(logits / T), the
    # distribution the rollout sampled from (the STEER release divides its logits by T the same way).
    temperature: float = 1.0
    # Reorder each mini-batch's rows so every micro-batch mixes prompts and lengths (balance.py), as
    # verl's balance_batch does before the release's per-GPU micro-batches.
    balance_batch: bool = False
    # token-mean's denominator: the valid tokens of the whole mini-batch on every DP rank (mini_batch,
    # gradients independent of the split) or of each micro-batch, the micro-batch means then
    # averaged over micro-batches and DP ranks (micro_batch: the release's verl actor).
    token_mean_over: str = "mini_batch"

    def __post_init__(self):
        if not self.lr_scale > 0:
            raise ValueError(f"ActorConfig.lr_scale={self.lr_scale} must be > 0")
        if not self.temperature > 0:
            raise ValueError(f"ActorConfig.temperature={self.temperature} must be > 0 (rollout.temperature)")
        if self.token_mean_over not in TOKEN_MEAN_OVER:
            raise ValueError(f"ActorConfig.token_mean_over={self.token_mean_over!r}: choose one of {TOKEN_MEAN_OVER}")
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


def _scale_output_input(module, args, kwargs):
    """Forward pre-hook: the output layer's input times 1 / T, so every path that turns it into
    statistics (logits with the torch or Triton kernels, or the fused LM head) sees logits / T,
    with no extra copy of the logits; the gradient flows through the scaling."""
    return (args[0] * module.steer_inv_temperature,) + tuple(args[1:]), kwargs


def apply_temperature(gpt, temperature: float) -> None:
    """Make gpt's output layer produce logits / temperature (once per model: actors may share it)."""
    layer = gpt.output_layer
    current = getattr(layer, "steer_inv_temperature", None)
    if current is None:
        layer.steer_inv_temperature = 1.0 / temperature
        if temperature != 1.0:  # T = 1 needs no hook
            layer.register_forward_pre_hook(_scale_output_input, with_kwargs=True, prepend=True)
    elif current != 1.0 / temperature:
        raise ValueError(f"the model's output layer already divides by temperature {1 / current}, this actor asks "
                         f"for {temperature}: actors sharing a model must share the temperature")


class MegatronActor:
    def __init__(self, model: torch.nn.Module, optimizer, cfg: ActorConfig, scheduler=None):
        self.model, self.optimizer, self.cfg, self.scheduler = model, optimizer, cfg, scheduler
        self.loss_fn = get_policy_loss(cfg.policy_loss)
        from steer_megatron.models.hf_import import unwrap

        gpt = unwrap(model)
        self._seq_multiple = gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1
        self._tap = None
        self._updates = 0  # update() calls, the default step of clip_cov's draw key
        if _is_last_stage():
            apply_temperature(gpt, cfg.temperature)
        if self._attribution():
            from steer_megatron.train.attribution import check_supported

            check_supported(model)
            if cfg.loss.loss_agg_mode != "token-mean" or cfg.token_mean_over != "mini_batch":
                raise ValueError("steer.form=attribution attributes the step of a token-mean loss over the mini-batch "
                                 f"(each token weighted 1/N); got loss_agg_mode={cfg.loss.loss_agg_mode!r}, "
                                 f"token_mean_over={cfg.token_mean_over!r}: use token-mean over mini_batch")
        if cfg.fused_lm_head and _is_last_stage():
            self._sequence_parallel = gpt.output_layer.sequence_parallel
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
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        hidden, weight = self._tap.take()
        # What ColumnParallelLinear does to its input, since each rank's fused backward holds only
        # its vocab shard's part of d loss / d hidden: under sequence parallelism the [s / tp, b, H]
        # shards are all-gathered and the gradient reduce-scattered back; otherwise identity
        # forward and the gradient all-reduced over TP. The all-reduce must see the gradient of
        # the layout the fused head returns: megatron reduces a contiguous copy of a strided one.
        if self._sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        hidden = hidden.transpose(0, 1)[:, :-1]  # [s, b, H] -> [b, s - 1, H]
        if not self._sequence_parallel:
            hidden = copy_to_tensor_model_parallel_region(hidden)
        return fused_linear_token_stats(hidden, weight, target, vocab_size=self.cfg.vocab_size, tp_group=tp_group,
                                        kernel=self.cfg.loss_kernel, p2_stats=p2_stats)

    def run_schedule(self, batch: ActorBatch, loss_func, forward_only: bool):
        """megatron's forward/backward schedule over micro-batches of `batch`."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron.core import parallel_state as ps

        mbs = self.cfg.micro_batch_size
        if self._seq_multiple > 1:
            batch = batch.lengthened(-(-batch.input_ids.shape[1] // self._seq_multiple) * self._seq_multiple)
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
        st = self._stats(batch, p2_stats)
        return (None, None) if st is None else (st["logprob"], st["entropy"])

    @torch.no_grad()
    def _stats(self, batch: ActorBatch, p2_stats: bool) -> dict[str, torch.Tensor] | None:
        self.model.eval()

        def loss_func(mb, logits):
            st = self.micro_batch_stats(logits, mb, p2_stats)
            out = {"logprob": st.logprob, "entropy": st.entropy}
            if p2_stats:
                out.update(sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp)
            return logits.new_zeros(()), out

        out = self.run_schedule(batch, loss_func, forward_only=True)
        self.model.train()
        if not _is_last_stage():
            return None
        n, t = len(batch), batch.input_ids.shape[1] - 1  # without the rows and positions run_schedule may have added
        return {k: torch.cat([o[k] for o in out])[:n, :t] for k in out[0]}

    def _needs_old_p2(self) -> bool:
        s = self.cfg.loss.steer
        return self.cfg.policy_loss == "steer" and s.group == "mini_batch" and s.form == "exact"

    def old_pass(self, batch: ActorBatch) -> None:
        """The old-log-prob pass: fills batch.old_log_prob and old_entropy (and, when STEER's exact
        form takes its group's range over the mini-batch, old_sum_p2 / old_sum_p2_logp) on the last stage."""
        st = self._stats(batch, self._needs_old_p2())
        if st is None:
            return
        batch.old_log_prob, batch.old_entropy = st["logprob"], st["entropy"]
        if self._needs_old_p2():
            batch.old_sum_p2, batch.old_sum_p2_logp = st["sum_p2"], st["sum_p2_logp"]

    def _attribution(self) -> bool:
        return self.cfg.policy_loss == "steer" and self.cfg.loss.steer.form == "attribution"

    def _omega_range(self, mini: ActorBatch):
        """steer.group=mini_batch: [min, max] |Omega| of the whole mini-batch on every DP rank, at the old policy."""
        from megatron.core import parallel_state as ps

        s = self.cfg.loss.steer
        if self.cfg.policy_loss != "steer" or s.group != "mini_batch" or not _is_last_stage():
            return None
        if s.form == "attribution":
            from steer_megatron.loss.steer import omega_range

            group = ps.get_data_parallel_group() if dist.is_initialized() else None
            return omega_range(mini.steer_attribution.abs(), mini.loss_mask, dp_group=group)
        if mini.old_entropy is None or (s.form == "exact" and mini.old_sum_p2 is None):
            raise ValueError("steer.group=mini_batch takes min/max |Omega| from the old-log-prob pass: run "
                             "MegatronActor.old_pass(batch) (it fills old_entropy and, for form=exact, old_sum_p2)")
        group = ps.get_data_parallel_group() if dist.is_initialized() else None
        return old_policy_omega_range(mini.advantages, mini.old_log_prob, mini.old_entropy, mini.loss_mask,
                                      form=s.form, sum_p2=mini.old_sum_p2, sum_p2_logp=mini.old_sum_p2_logp,
                                      dp_group=group)

    # -- update -------------------------------------------------------------------------------
    def _global_tokens(self, mini: ActorBatch) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        n = mini.loss_mask.sum().to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(n, group=ps.get_data_parallel_group())
        return n

    def update(self, batch: ActorBatch, *, step: int | None = None) -> dict[str, float]:
        """ppo_epochs passes over mini-batches; one optimizer step per mini-batch. Returns mean metrics.

        step: the RL step, part of the key of every random draw in the loss (clip_cov), with the run
        seed, the epoch, the mini-batch, the micro-batch and the DP rank; default: calls so far."""
        from megatron.core import parallel_state as ps

        if _is_last_stage() and (batch.advantages is None or batch.old_log_prob is None):
            raise ValueError("update() needs advantages and old_log_prob (run compute_log_probs first)")
        cfg = self.cfg
        step = self._updates if step is None else step
        self._updates += 1
        if cfg.loss.correction.drops_tokens and batch.old_log_prob is not None:
            # masked IS drops tokens before the token count of each mini-batch is taken (the loss drops them again)
            batch = replace(batch, loss_mask=keep_mask(batch.old_log_prob, batch.rollout_log_prob, batch.loss_mask,
                                                       cfg.loss.correction))
        form = cfg.loss.steer.form if cfg.policy_loss == "steer" else None
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        sums: dict[str, float] = {}
        count = 0
        grad_norms = []
        for epoch in range(cfg.ppo_epochs):
            for mini_index, start in enumerate(range(0, len(batch), cfg.mini_batch_size)):
                mini = batch.slice(start, start + cfg.mini_batch_size)
                if cfg.balance_batch:
                    mini = mini.take(balanced_order(row_lengths(mini.loss_mask), cfg.micro_batch_size))
                n_micro = -(-len(mini) // cfg.micro_batch_size)
                token_mean = cfg.loss.loss_agg_mode == "token-mean" and cfg.token_mean_over == "mini_batch"
                # token-mean over the whole mini-batch on every DP rank: the schedule divides by the
                # number of micro-batches and DDP averages over DP, so undo both. (token_mean_over=
                # micro_batch keeps both: each micro-batch's own token-mean, averaged, as released.)
                normalizer = self._global_tokens(mini) if token_mean else None
                scale = n_micro * dp if token_mean else 1
                if self._attribution():
                    from steer_megatron.train.attribution import entropy_attribution

                    attr = entropy_attribution(self, mini, normalizer)
                    mini = replace(mini, steer_attribution=None if attr is None else attr[0])
                omega_range = self._omega_range(mini)
                micro_index = iter(range(n_micro))

                def loss_func(mb, logits):
                    st = self.micro_batch_stats(logits, mb, p2_stats=form == "exact")
                    inp = PolicyLossInputs(
                        log_prob=st.logprob, old_log_prob=mb.old_log_prob, advantages=mb.advantages,
                        mask=mb.loss_mask, entropy=st.entropy, old_entropy=mb.old_entropy,
                        sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp, ref_log_prob=mb.ref_log_prob,
                        rollout_log_prob=mb.rollout_log_prob, token_normalizer=normalizer,
                        dp_group=ps.get_data_parallel_group(), omega_range=omega_range,
                        attribution=mb.steer_attribution,
                        draw_key=(step, epoch, mini_index, next(micro_index), dp_rank),
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
        if getattr(self.model, "use_forward_hook", False):
            # overlap_param_gather: the last step's parameter all-gather waits for the next forward;
            # weight sync, checkpoints and diagnostics read the weights before that, so gather now
            self.model.start_param_sync(force_sync=True)
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        return metrics
