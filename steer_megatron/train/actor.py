"""The policy on Megatron-Core: per-token statistics passes and PPO-style updates.

Runs through megatron-core's own forward/backward schedule (so pipeline parallelism uses its 1F1B
schedule), megatron DDP and megatron's optimizer. Every rank of a TP/PP group receives the same
micro-batches; the statistics and the loss live on the last pipeline stage.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist

from steer_megatron.loss.rollout_correction import keep_mask
from steer_megatron.loss import (
    PolicyLossConfig,
    PolicyLossInputs,
    TokenStats,
    fused_linear_token_loss,
    fused_linear_token_stats,
    get_policy_loss,
    token_stats,
)
from steer_megatron.loss.kernels import auto_fallback
from steer_megatron.loss.policy_losses import context_parallel_blocker, loss_needs
from steer_megatron.train.actor_batch import ActorBatch
from steer_megatron.train.balance import balanced_order, row_lengths
from steer_megatron.train.context_parallel import CPShare, cp_share, gather_share, reduce_metrics_over_cp
from steer_megatron.train.head_forms import token_loss_blocker
from steer_megatron.train.output_layer_hooks import HiddenStatesTap, apply_temperature
from steer_megatron.train.packing import PackedMicroBatch, pack, plan_micro_batches, sequence_lengths

TOKEN_MEAN_OVER = ("mini_batch", "micro_batch")
# the per-token inputs of the policy loss that come with the batch (fixed before the step)
_LOSS_DATA = ("old_log_prob", "advantages", "loss_mask", "old_entropy", "ref_log_prob", "rollout_log_prob",
              "steer_attribution")
_log = logging.getLogger(__name__)


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
    # Packed sequences (train/packing.py): each micro-batch's sequences are trimmed to their length
    # and packed into rows, TE's THD layout or a block-diagonal mask on the local spec.
    pack_sequences: bool = False
    # Token-budget micro-batches: a micro-batch holds as many sequences as fit in this many tokens
    # (real tokens when packed, rows x longest row when padded) instead of micro_batch_size rows.
    max_tokens_per_micro_batch: int | None = None

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
        if self.max_tokens_per_micro_batch is not None:
            if not self.max_tokens_per_micro_batch > 0:
                raise ValueError(f"trainer.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be > 0")
            # the split into micro-batches then depends on the lengths: only split-independent losses
            if self.loss.loss_agg_mode != "token-mean" or self.token_mean_over != "mini_batch":
                raise ValueError("trainer.max_tokens_per_micro_batch needs algorithm.loss_agg_mode=token-mean and "
                                 "algorithm.token_mean_over=mini_batch (a loss that does not depend on the split); "
                                 f"got {self.loss.loss_agg_mode} / {self.token_mean_over}")
            if self.policy_loss == "steer" and self.loss.steer.group != "mini_batch":
                raise ValueError("trainer.max_tokens_per_micro_batch needs algorithm.steer.group=mini_batch (STEER's "
                                 f"weights from the whole mini-batch, independent of the split); got {self.loss.steer.group}")


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


def _cp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def _is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=True)


class MegatronActor:
    def __init__(self, model: torch.nn.Module, optimizer, cfg: ActorConfig, scheduler=None):
        self.model, self.optimizer, self.cfg, self.scheduler = model, optimizer, cfg, scheduler
        self.loss_fn = get_policy_loss(cfg.policy_loss)
        from steer_megatron.models.hf_import import unwrap

        gpt = unwrap(model)
        # context parallelism: every micro-batch is split into 2 * cp chunks of its sequence (CPShare)
        self._cp = _cp_size()
        self._seq_multiple = (gpt.config.tensor_model_parallel_size if gpt.config.sequence_parallel else 1) * (
            2 * self._cp if self._cp > 1 else 1)
        if self._cp > 1:
            blocker = context_parallel_blocker(cfg.policy_loss, cfg.loss, cfg.token_mean_over)
            if blocker is None and (cfg.fused_lm_head or cfg.pack_sequences):
                blocker = "algorithm.fused_lm_head and trainer.pack_sequences are not wired for context parallelism"
            if blocker is not None:
                raise ValueError(f"parallel.cp={self._cp}: {blocker} (or set parallel.cp=1)")
        self._tap = None
        # packed sequences: TE attention takes THD + cu_seqlens; the local spec a block-diagonal mask,
        # with each sequence's own positions fed to RoPE by a hook on the rotary embedding
        self._thd = "TE" in type(gpt.decoder.layers[0].self_attention.core_attention).__name__ if (
            cfg.pack_sequences and len(gpt.decoder.layers)) else False
        self._rope_positions: torch.Tensor | None = None
        if cfg.pack_sequences and not self._thd:
            gpt.rotary_pos_emb.register_forward_hook(self._packed_rope)
        self.batching: dict[str, float] = {}  # padding of the last schedule run (metrics)
        self._updates = 0  # update() calls, the default step of clip_cov's draw key
        if _is_last_stage():
            apply_temperature(gpt, cfg.temperature)
        self._token_loss_form = False  # the fused head's gradient-in-forward form (head_forms.py)
        if self._attribution():
            from steer_megatron.train.attribution import check_supported

            check_supported(model)
            if cfg.loss.loss_agg_mode != "token-mean" or cfg.token_mean_over != "mini_batch":
                raise ValueError("steer.form=attribution attributes the step of a token-mean loss over the mini-batch "
                                 f"(each token weighted 1/N); got loss_agg_mode={cfg.loss.loss_agg_mode!r}, "
                                 f"token_mean_over={cfg.token_mean_over!r}: use token-mean over mini_batch")
        if cfg.fused_lm_head and _is_last_stage():
            self._sequence_parallel = gpt.output_layer.sequence_parallel
            self._tap = HiddenStatesTap()
            gpt.output_layer.register_forward_pre_hook(self._tap, with_kwargs=True)
            blocker = token_loss_blocker(cfg.policy_loss, cfg.loss, cfg.token_mean_over)
            self._token_loss_form = blocker is None
            if blocker is not None:
                _log.info("fused_lm_head: updates use the recompute form (8 N H V): %s", blocker)

    def _packed_rope(self, module, args, emb):
        """Forward hook on the rotary embedding: [s, 1, 1, d] -> [s, rows, 1, d] at each packed
        token's own position (megatron's unfused RoPE broadcasts over the batch dimension)."""
        if self._rope_positions is None:
            return None
        return emb[:, 0, 0][self._rope_positions.t()].unsqueeze(2)

    # -- statistics ---------------------------------------------------------------------------
    @staticmethod
    def _labels(mb: ActorBatch) -> torch.Tensor:
        """[b, s] next-token ids: position t predicts input_ids[:, t + 1]. The statistics run on all s
        positions of the layout megatron returns (no copy of the logits for a shift); the last
        position's label wraps to a real id and its statistics are dropped ([:, :-1]), so it takes
        no part in any loss and gets a zero gradient."""
        return mb.input_ids.roll(-1, dims=1)

    def micro_batch_stats(self, output: torch.Tensor, mb: ActorBatch, p2_stats: bool) -> TokenStats:
        """Token statistics [b, s - 1] of a micro-batch from the model's output: logits [b, s, V_local]
        (megatron's contiguous layout, flattened without a copy), or with fused_lm_head the hidden
        states kept by the output layer's hook. No host sync: the target ids are checked once per
        batch (run_schedule) and non-finite logits are counted on the device (_nonfinite)."""
        from megatron.core import parallel_state as ps

        if isinstance(mb, PackedMicroBatch):  # statistics of the packed rows, in the micro-batch's own layout
            return mb.unpack(self.micro_batch_stats(output, mb.rows, p2_stats))

        tp_group = ps.get_tensor_model_parallel_group()
        if isinstance(mb, CPShare):  # this CP rank's positions, labels from the whole sequence, nothing to drop
            return token_stats(output, mb.labels, vocab_size=self.cfg.vocab_size, tp_group=tp_group,
                               chunk_tokens=self.cfg.chunk_tokens, p2_stats=p2_stats, kernel=self.cfg.loss_kernel,
                               inplace_backward=True, check_inputs=False)
        labels = self._labels(mb)
        if self._tap is None:
            # in place: megatron keeps no other use of the logits, so their storage takes the gradient
            st = token_stats(output, labels, vocab_size=self.cfg.vocab_size, tp_group=tp_group,
                             chunk_tokens=self.cfg.chunk_tokens, p2_stats=p2_stats, kernel=self.cfg.loss_kernel,
                             inplace_backward=True, check_inputs=False)
            return _each(st, lambda x: x[:, :-1])
        hidden, weight = self._head_inputs()
        st = fused_linear_token_stats(hidden, weight, labels.t(), vocab_size=self.cfg.vocab_size, tp_group=tp_group,
                                      kernel=self.cfg.loss_kernel, p2_stats=p2_stats, check_inputs=False)
        return _each(st, lambda x: x.t()[:, :-1])  # [s, b] -> [b, s - 1]

    def _head_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept [s, b, H] hidden states, prepared as ColumnParallelLinear prepares its input, and
        the output weight. Each rank's fused backward holds only its vocab shard's part of
        d loss / d hidden: under sequence parallelism the [s / tp, b, H] shards are all-gathered and
        the gradient reduce-scattered back; otherwise identity forward and the gradient all-reduced
        over TP. The fused heads flatten [s, b, H] as a view, so the gradient arrives contiguous."""
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        hidden, weight = self._tap.take()
        if self._sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden)
        return hidden, weight

    def _fused_token_loss(self, mb: ActorBatch, make_inputs) -> tuple[torch.Tensor, dict]:
        """The update's loss with the fused head's gradient-in-forward form: the loss and its
        gradients in one pass over token chunks (6 N H V). make_inputs(stats, data) -> PolicyLossInputs.
        The metrics come from the same policy loss on the whole micro-batch's detached statistics."""
        from megatron.core import parallel_state as ps

        hidden, weight = self._head_inputs()

        def token_order(t):  # [b, s - 1] -> [s * b] in the head's token order, the last position padded
            return None if t is None else torch.cat([t, t.new_zeros(t.shape[0], 1)], 1).t().reshape(-1)

        flat = {name: token_order(getattr(mb, name)) for name in _LOSS_DATA}

        def token_loss(st: TokenStats, rows: slice) -> torch.Tensor:
            data = SimpleNamespace(**{k: None if v is None else v[rows] for k, v in flat.items()})
            return self.loss_fn(make_inputs(st, data), self.cfg.loss)[0]

        total, st = fused_linear_token_loss(hidden, weight, self._labels(mb).t(), token_loss,
                                            vocab_size=self.cfg.vocab_size,
                                            tp_group=ps.get_tensor_model_parallel_group(),
                                            chunk_tokens=self.cfg.chunk_tokens, kernel=self.cfg.loss_kernel,
                                            check_inputs=False)
        st = _each(st, lambda x: x.t()[:, :-1])
        with torch.no_grad():
            loss, metrics = self.loss_fn(make_inputs(st, mb), self.cfg.loss)
        metrics["nonfinite_logit_rows"] = _nonfinite(st)
        metrics["loss"] = loss
        return total, metrics

    def _check_target_ids(self, batch: ActorBatch) -> None:
        """Every target id in [0, vocab_size): one host sync per batch, where token_stats' own check
        would cost one per micro-batch."""
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(batch.input_ids)).tolist())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}); got min {lo}, max {hi}. "
                             "Check the tokenizer against the model's vocabulary (model.vocab_size)")

    def micro_batches(self, batch: ActorBatch):
        """(micro-batches, row groups): `batch` cut as the schedule runs it. Row groups are the batch
        rows of each micro-batch, or None when micro-batches are consecutive slices of micro_batch_size."""
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        mbs, mult = cfg.micro_batch_size, self._seq_multiple
        pipelined = ps.get_pipeline_model_parallel_world_size() > 1
        if not cfg.pack_sequences and cfg.max_tokens_per_micro_batch is None:
            if mult > 1:
                batch = batch.lengthened(-(-batch.input_ids.shape[1] // mult) * mult)
            if len(batch) % mbs and pipelined:
                # pipeline stages exchange activations of one fixed [seq, mbs, hidden] shape, so a short
                # last micro-batch (the parity probe's few prompts, a diagnostics slice) is filled up
                batch = batch.padded(mbs - len(batch) % mbs)
            return self._cp_shares([batch.slice(i, i + mbs) for i in range(0, len(batch), mbs)]), None
        lengths = [int(n) for n in sequence_lengths(batch)]
        if cfg.max_tokens_per_micro_batch is None:
            groups = [list(range(i, min(i + mbs, len(batch)))) for i in range(0, len(batch), mbs)]
        else:
            groups = plan_micro_batches(lengths, cfg.max_tokens_per_micro_batch, padded=not cfg.pack_sequences)
            count = torch.tensor(len(groups))
            if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
                # every DP rank runs as many micro-batches (the one with most tokens sets the count)
                dist.all_reduce(count, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
            if int(count) > len(groups):
                groups = plan_micro_batches(lengths, cfg.max_tokens_per_micro_batch, padded=not cfg.pack_sequences,
                                            min_count=int(count))
        parts = [batch.take(torch.tensor(g, dtype=torch.long)) for g in groups]
        longest = [max(lengths[i] for i in g) for g in groups]
        if cfg.pack_sequences:
            if self._thd:  # one row of every token; under PP all micro-batches as long as the longest
                need = [sum(lengths[i] for i in g) for g in groups]
                row_len = [max(need) if pipelined else n for n in need]
                micro = [pack(p, row_len=n, rows=1, multiple=mult) for p, n in zip(parts, row_len)]
            else:  # rows as long as the batch's longest sequence (attention cost per token <= that length)
                micro = [pack(p, row_len=max(longest), multiple=mult) for p in parts]
                if pipelined:  # the same rows x length for every micro-batch
                    rows = max(len(m.rows) for m in micro)
                    micro = [pack(p, row_len=max(longest), rows=rows, multiple=mult) for p in parts]
        else:
            width = [max(longest) if pipelined else n for n in longest]
            micro = [p.trimmed(n).lengthened(-(-n // mult) * mult) for p, n in zip(parts, width)]
            if pipelined:
                rows = max(len(m) for m in micro)
                micro = [m.padded(rows - len(m)) if len(m) < rows else m for m in micro]
            micro = self._cp_shares(micro)
        return micro, groups

    def _cp_shares(self, micro: list) -> list:
        """Each micro-batch's share on this CP rank (unchanged without context parallelism)."""
        if self._cp == 1:
            return micro
        from megatron.core import parallel_state as ps

        return [cp_share(m, ps.get_context_parallel_rank(), self._cp) for m in micro]

    def run_schedule(self, batch: ActorBatch, loss_func, forward_only: bool, micro=None):
        """megatron's forward/backward schedule over micro-batches of `batch` (or the given ones)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if _is_last_stage():
            self._check_target_ids(batch)
        if micro is None:
            micro, _ = self.micro_batches(batch)
        def computed_rows(m):  # the rows the forward computes (a CP share: its whole sequences)
            return m.rows if isinstance(m, PackedMicroBatch) else m.source if isinstance(m, CPShare) else m

        # the shape pipeline stages exchange (the same for all under PP; megatron divides it by CP)
        rows, seq = computed_rows(micro[0]).input_ids.shape
        real = sum(int(n) for m in micro
                   for n in sequence_lengths(m.source if isinstance(m, (PackedMicroBatch, CPShare)) else m))
        computed = sum(computed_rows(m).input_ids.numel() for m in micro)
        self.batching = {"padding_fraction": 1.0 - real / max(computed, 1), "tokens_per_micro_batch": real / len(micro),
                         "micro_batches": float(len(micro))}

        def forward_step(data_iter, model):
            mb = next(data_iter)
            if isinstance(mb, PackedMicroBatch):
                return self._packed_forward(model, mb), partial(loss_func, mb)
            if isinstance(mb, CPShare):  # megatron's CP attention and RoPE take this rank's positions as given
                return model(mb.input_ids, mb.position_ids, None), partial(loss_func, mb)
            pos = torch.arange(mb.input_ids.shape[1], device=mb.input_ids.device)[None].expand_as(mb.input_ids)
            return model(mb.input_ids, pos, None), partial(loss_func, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[self.model],
            num_microbatches=len(micro), seq_length=seq, micro_batch_size=rows, forward_only=forward_only,
        )

    def _packed_forward(self, model, mb: PackedMicroBatch):
        ids = mb.rows.input_ids
        if self._thd:  # Transformer Engine: THD with cu_seqlens (untested: no TE where this was written)
            from megatron.core.packed_seq_params import PackedSeqParams

            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
                                     max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)
            return model(ids, mb.position_ids, None, packed_seq_params=params)
        self._rope_positions = mb.position_ids
        try:
            return model(ids, mb.position_ids, mb.attention_mask())
        finally:
            self._rope_positions = None

    @torch.no_grad()
    def compute_log_probs(self, batch: ActorBatch, *, p2_stats: bool = False):
        """(log_prob, entropy) [B, L-1] of the current weights on the last stage, None elsewhere."""
        st = self.token_statistics(batch, p2_stats)
        return (None, None) if st is None else (st["logprob"], st["entropy"])

    @torch.no_grad()
    def token_statistics(self, batch: ActorBatch, p2_stats: bool) -> dict[str, torch.Tensor] | None:
        """logprob, entropy (and sum_p2, sum_p2_logp) [B, L-1] on the last stage, None elsewhere: the
        actor's own micro-batching, packing and context-parallel split, gathered back."""
        self.model.eval()

        def loss_func(mb, logits):
            st = self.micro_batch_stats(logits, mb, p2_stats)
            out = {"logprob": st.logprob, "entropy": st.entropy}
            if p2_stats:
                out.update(sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp)
            if isinstance(mb, CPShare):  # every CP rank gets the whole sequences' statistics
                from megatron.core import parallel_state as ps

                out = {k: gather_share(v, mb, ps.get_context_parallel_group()) for k, v in out.items()}
            return logits.new_zeros(()), out

        micro, groups = self.micro_batches(batch)
        out = self.run_schedule(batch, loss_func, forward_only=True, micro=micro)
        self.model.train()
        if not _is_last_stage():
            return None
        _raise_on_nonfinite([_nonfinite(TokenStats(o["logprob"], o["entropy"], None, None)) for o in out])
        n, t = len(batch), batch.input_ids.shape[1] - 1  # without the rows and positions run_schedule may have added
        if groups is None:
            return {k: torch.cat([o[k] for o in out])[:n, :t] for k in out[0]}
        result = {}
        for k in out[0]:  # each micro-batch's rows back to their places (positions past a micro-batch's width: 0)
            full = out[0][k].new_zeros(n, t)
            for g, o in zip(groups, out):
                w = min(o[k].shape[1], t)
                full[torch.tensor(g, dtype=torch.long), :w] = o[k][: len(g), :w]
            result[k] = full
        return result

    def needs(self):
        """What the loss declared it needs at the current settings (policy_losses.LossNeeds); asked
        where used, since cfg can change between steps (the closed loop moves w_min)."""
        return loss_needs(self.cfg.policy_loss, self.cfg.loss)

    def old_pass(self, batch: ActorBatch) -> None:
        """The old-log-prob pass: fills batch.old_log_prob and old_entropy (and old_sum_p2 /
        old_sum_p2_logp when the loss declares old_p2_stats) on the last stage."""
        old_p2 = self.needs().old_p2_stats
        st = self.token_statistics(batch, old_p2)
        if st is None:
            return
        batch.old_log_prob, batch.old_entropy = st["logprob"], st["entropy"]
        if old_p2:
            batch.old_sum_p2, batch.old_sum_p2_logp = st["sum_p2"], st["sum_p2_logp"]

    def _attribution(self) -> bool:
        return self.needs().attribution

    def _mini_batch_stat(self, mini: ActorBatch):
        """The loss's per-mini-batch statistic (LossNeeds.mini_batch_stat; STEER's group=mini_batch
        range of |Omega|) from the old pass's values (and attribution) of the whole mini-batch on
        every DP rank."""
        from megatron.core import parallel_state as ps

        stat = self.needs().mini_batch_stat
        if stat is None or not _is_last_stage():
            return None
        group = ps.get_data_parallel_group() if dist.is_initialized() else None
        old = PolicyLossInputs(log_prob=mini.old_log_prob, old_log_prob=mini.old_log_prob, advantages=mini.advantages,
                               mask=mini.loss_mask, old_entropy=mini.old_entropy, sum_p2=mini.old_sum_p2,
                               sum_p2_logp=mini.old_sum_p2_logp, attribution=mini.steer_attribution, dp_group=group)
        return stat(old, self.cfg.loss)

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
        p2_stats = self.needs().p2_stats
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        cp_group = ps.get_context_parallel_group() if self._cp > 1 else None
        sums: dict[str, float] = {}
        batching: dict[str, float] = {}
        n_minis = -(-len(batch) // cfg.mini_batch_size)
        count = 0
        grad_norms = []
        for epoch in range(cfg.ppo_epochs):
            for mini_index, start in enumerate(range(0, len(batch), cfg.mini_batch_size)):
                mini = batch.slice(start, start + cfg.mini_batch_size)
                if cfg.balance_batch:
                    mini = mini.take(balanced_order(row_lengths(mini.loss_mask), cfg.micro_batch_size))
                token_mean = cfg.loss.loss_agg_mode == "token-mean" and cfg.token_mean_over == "mini_batch"
                # token-mean over the whole mini-batch on every DP rank: the schedule divides by the
                # number of micro-batches and DDP averages over DP, so undo both. (token_mean_over=
                # micro_batch keeps both: each micro-batch's own token-mean, averaged, as released.)
                normalizer = self._global_tokens(mini) if token_mean else None
                if self._attribution():  # before the micro-batches are cut: they carry its values
                    from steer_megatron.train.attribution import entropy_attribution

                    attr = entropy_attribution(self, mini, normalizer)
                    mini = replace(mini, steer_attribution=None if attr is None else attr[0])
                micro, _ = self.micro_batches(mini)
                n_micro = len(micro)
                scale = n_micro * dp if token_mean else 1
                omega_range = self._mini_batch_stat(mini)
                micro_index = iter(range(n_micro))

                def loss_func(mb, logits):
                    key = (step, epoch, mini_index, next(micro_index), dp_rank)

                    def make_inputs(st, data):  # data: the micro-batch, or one token chunk of it
                        return PolicyLossInputs(
                            log_prob=st.logprob, old_log_prob=data.old_log_prob, advantages=data.advantages,
                            mask=data.loss_mask, entropy=st.entropy, old_entropy=data.old_entropy,
                            sum_p2=st.sum_p2, sum_p2_logp=st.sum_p2_logp, ref_log_prob=data.ref_log_prob,
                            rollout_log_prob=data.rollout_log_prob, token_normalizer=normalizer,
                            dp_group=ps.get_data_parallel_group(with_context_parallel=True), cp_group=cp_group,
                            omega_range=omega_range, draw_key=key, attribution=data.steer_attribution,
                        )

                    if self._token_loss_form and not isinstance(mb, PackedMicroBatch):
                        loss, metrics = self._fused_token_loss(mb, make_inputs)
                        return loss * scale, metrics
                    st = self.micro_batch_stats(logits, mb, p2_stats=p2_stats)
                    loss, metrics = self.loss_fn(make_inputs(st, mb), cfg.loss)
                    metrics["loss"] = loss.detach().clone()
                    metrics["nonfinite_logit_rows"] = _nonfinite(st)
                    return loss * scale, metrics

                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()
                out = self.run_schedule(mini, loss_func, forward_only=False, micro=micro)
                for k, v in self.batching.items():
                    batching[k] = batching.get(k, 0.0) + v / (cfg.ppo_epochs * n_minis)
                if _is_last_stage():  # one sync per mini-batch, after the schedule
                    _raise_on_nonfinite([o.pop("nonfinite_logit_rows") for o in out])
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
        if cp_group is not None:  # each CP rank's metrics are of its share of the sequences
            metrics = reduce_metrics_over_cp(metrics, cp_group)
        metrics["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        metrics.update({f"batching/{k}": v for k, v in batching.items()})
        # 1 when loss_kernel=auto ran the ~55x slower PyTorch statistics on CUDA (Triton cannot load)
        metrics["loss_kernel_fallback"] = float(auto_fallback() is not None)
        return metrics


def _each(st: TokenStats, fn) -> TokenStats:
    return TokenStats(*(fn(getattr(st, f.name)) for f in fields(st)))


def _nonfinite(st: TokenStats) -> torch.Tensor:
    """Tokens whose log-prob or entropy is NaN/Inf (non-finite logits), counted on the device."""
    return (~torch.isfinite(st.logprob)).sum() + (~torch.isfinite(st.entropy)).sum()


def _raise_on_nonfinite(counts: list[torch.Tensor]) -> None:
    bad = int(torch.stack(counts).sum()) if counts else 0
    if bad:
        raise FloatingPointError(
            f"the model's logits are NaN or Inf at {bad} token statistic(s) of this batch; they are not zeroed "
            "silently. Check the model for overflow (lower the LR, use bf16/fp32) or the input for masked logits")
