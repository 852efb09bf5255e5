"""Packed sequences and token-budget micro-batches (train/packing.py) against the padded path.

The padded path is the reference (itself checked against float64 autograd in tests/test_steer_groups.py):
packing changes only which rows the forward computes, so the per-token statistics, the STEER loss
(steer.group=mini_batch, form=exact: the p^2 statistics go through the unpacking too) and every
parameter's gradient must match it at TP=1, TP=2 and PP=2, and with token-budget micro-batches on
DP = 2 ranks the gradient of the whole mini-batch must equal DP = 1's.

Tolerances: both paths compute the same fp32 values in a different order (other matmul shapes, more
masked entries whose exp is exactly 0), so they differ by rounding only: a 64-term fp32 reduction
of terms of size ~1 differs by at most ~64 * 6e-8 ~ 4e-6 relative, compounded over 2 layers and the
log-softmax over 150 logits (|log p| <= ~10): atol 2e-5 on per-token statistics; gradients as in
tests/test_steer_groups.py (rtol 1e-4, atol 1e-5 x the largest gradient entry).
"""
import pytest
import torch

from steer_megatron.parallel import spawn_ranks
from steer_megatron.train.actor import ActorBatch
from steer_megatron.train.packing import pack, plan_micro_batches, sequence_lengths
from tests.models_helpers import update_gradients

VOCAB = 150
ARCH = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)


def _batch():
    """8 sequences of 8..22 tokens (prompt 6, response 2..16) right-padded to 24, unequal advantages."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (8, 24), generator=g)
    mask = torch.zeros(8, 23, dtype=torch.bool)
    stops = [7, 21, 9, 15, 8, 19, 12, 11]  # the last response position of each row
    for i, stop in enumerate(stops):
        mask[i, 5:stop + 1] = True
    adv = torch.randn(8, generator=g)[:, None] * mask
    return ActorBatch(input_ids=ids, loss_mask=mask, advantages=adv)


def test_pack_layout_positions_mask_and_unpack():
    batch = _batch()
    lengths = sequence_lengths(batch).tolist()
    assert lengths == [9, 23, 11, 17, 10, 21, 14, 13]
    pm = pack(batch, multiple=2)  # rows of the longest sequence (23), rounded up to 24
    ids, pos, seg = pm.rows.input_ids, pm.position_ids, pm.segment_ids
    assert ids.shape[1] == 24 and len(pm.rows) < len(batch)  # fewer rows than sequences
    assert pm.real_tokens == sum(lengths) and pm.computed_tokens == ids.numel()
    for i, n in enumerate(lengths):  # each sequence whole, in order, positions from 0
        r, c = (seg == i).nonzero(as_tuple=True)
        assert len(r) == n and len(set(r.tolist())) == 1
        assert torch.equal(ids[r, c], batch.input_ids[i, :n]) and pos[r, c].tolist() == list(range(n))
    mask = pm.attention_mask()[:, 0]  # True = masked
    for row in range(len(ids)):
        for q in range(24):
            for k in range(24):
                assert bool(mask[row, q, k]) == (k > q or bool(seg[row, q] != seg[row, k]))
    # unpack: a packed per-position quantity lands on the source position that predicts the same token
    target = ids[:, 1:].float()
    from steer_megatron.loss import TokenStats

    out = pm.unpack(TokenStats(target, target, target, target)).logprob
    for i, n in enumerate(lengths):
        assert torch.equal(out[i, : n - 1], batch.input_ids[i, 1:n].float()) and not out[i, n - 1:].any()
    assert torch.equal(pm.rows.loss_mask.sum(), batch.loss_mask.sum())  # no token across a boundary counts
    assert pm.loss_mask is batch.loss_mask  # a loss reads the micro-batch's own tensors


def test_plan_micro_batches_respects_the_budget_and_balances():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 400, (64,), generator=g).tolist()
    for padded in (False, True):
        plan = plan_micro_batches(lengths, 1024, padded=padded)
        assert sorted(i for b in plan for i in b) == list(range(64))
        cost = [len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b) for b in plan]
        assert max(cost) <= 1024
        if not padded:  # as few micro-batches as the total allows, within one longest sequence of each other
            assert len(plan) == -(-sum(lengths) // 1024) and max(cost) - min(cost) <= max(lengths)
    assert len(plan_micro_batches(lengths, 1024, padded=False, min_count=20)) == 20
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=300 is below a sequence"):
        plan_micro_batches(lengths, 300, padded=False)


# -- through MegatronActor (tiny Qwen2-like model, gloo ranks) ---------------------------------------

CONFIGS = {
    "padded": dict(micro_batch_size=2),
    "packed": dict(micro_batch_size=4, pack_sequences=True),  # mini_batch group and normaliser: split-independent
    "budget_packed": dict(max_tokens_per_micro_batch=40, pack_sequences=True),
    "budget_padded": dict(max_tokens_per_micro_batch=48),
}


def _run(cfg_kwargs, weights, dp_balance=False):
    """old pass + one update with a capturing optimizer: (stats on the last stage, main_grad per parameter, metrics)."""
    from megatron.core import parallel_state as ps

    from steer_megatron.loss import PolicyLossConfig, SteerConfig
    from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
    from steer_megatron.train.actor import ActorConfig, MegatronActor
    from steer_megatron.train.optim import OptimSettings, wrap_for_training

    model, _ = build_gpt_model(parse_hf_config(ARCH))
    if weights is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
    ddp, opt, sched = wrap_for_training(model, OptimSettings(lr=1.0, weight_decay=0.0, clip_grad=0.0))
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    loss = PolicyLossConfig(steer=SteerConfig(group="mini_batch", form="exact"))
    actor = MegatronActor(ddp, opt, ActorConfig(vocab_size=VOCAB, mini_batch_size=8 // dp, loss=loss, **cfg_kwargs),
                          sched)
    batch = _batch().dp_slice(rank, dp, balance_rows=8 // dp if dp_balance else None)
    actor.old_pass(batch)
    grads, metrics = update_gradients(actor, model, batch)
    stats = None if batch.old_log_prob is None else (batch.loss_mask, batch.old_log_prob, batch.old_entropy,
                                                     batch.old_sum_p2, batch.old_sum_p2_logp)
    return stats, grads, metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


def layout_worker(tp, pp):
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(tp=tp, pp=pp), seed=3)
    out, weights = {}, None
    for name, kw in CONFIGS.items():
        out[name] = _run(kw, weights)
        if weights is None:
            weights = out[name][3]
    return out


def _close_grads(a, b):
    scale = max(float(v.abs().max()) for v in b.values())
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{k}: {m}")


def _check_layout(results):
    for out in results:
        ref_stats, ref_grads, ref_metrics, _ = out["padded"]
        assert max(float(g.abs().max()) for g in ref_grads.values()) > 0
        for name in CONFIGS:
            stats, grads, metrics, _ = out[name]
            _close_grads(grads, ref_grads)
            if ref_stats is not None:  # the last pipeline stage
                mask = ref_stats[0]
                for got, want in zip(stats[1:], ref_stats[1:]):
                    torch.testing.assert_close(got[mask], want[mask], atol=2e-5, rtol=0)
                total = metrics["pg_loss"] * metrics["batching/micro_batches"]  # the metric is a mean over micro-batches
                assert abs(total - ref_metrics["pg_loss"] * ref_metrics["batching/micro_batches"]) < 2e-5
                if "packed" in name:  # padded under PP: one shape for all micro-batches, so more padding
                    assert metrics["batching/padding_fraction"] < ref_metrics["batching/padding_fraction"]
        if out["padded"][0] is not None:
            assert out["packed"][2]["batching/padding_fraction"] < 0.25 < out["padded"][2]["batching/padding_fraction"]
            assert out["budget_packed"][2]["batching/tokens_per_micro_batch"] <= 40


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_packed_and_token_budget_equal_padded(tp, pp):
    _check_layout(spawn_ranks(layout_worker, tp * pp, tp, pp))


def dp_worker(weights, kw):
    from steer_megatron.parallel import ParallelLayout, init_parallel

    init_parallel(ParallelLayout(), seed=3)
    return _run(kw, weights, dp_balance=True)[1]


def test_token_budget_on_two_dp_ranks_equals_one_rank():
    """The sequences are dealt to the DP ranks by length and split into micro-batches by tokens; the
    mini-batch's gradient (token-mean over its tokens, STEER's mini_batch group) is DP = 1's."""
    (ref,) = spawn_ranks(layout_worker, 1, 1, 1)
    weights = ref["padded"][3]
    for grads in spawn_ranks(dp_worker, 2, weights, CONFIGS["budget_packed"]):
        _close_grads(grads, ref["padded"][1])


def test_config_refuses_a_budget_the_loss_would_depend_on():
    from pathlib import Path

    from steer_megatron.config import ConfigError, load_config, validate_config

    CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

    base = ["trainer.max_tokens_per_micro_batch=8192", "algorithm.steer.group=mini_batch",
            "algorithm.token_mean_over=mini_batch"]
    cfg = load_config(CONFIG_DIR / "qwen2.5-math-7b_steer.yaml", base)
    validate_config(cfg, check_paths=False)  # the recipe's 1024 + 3072 tokens fit, the loss is split-independent
    for extra, match in [(["trainer.max_tokens_per_micro_batch=2048"], "below the longest sequence"),
                         (["algorithm.steer.group=micro_batch"], "steer.group=mini_batch"),
                         (["algorithm.token_mean_over=micro_batch"], "token_mean_over=mini_batch"),
                         (["trainer.max_tokens_per_micro_batch=0"], "must be > 0")]:
        with pytest.raises(ConfigError, match=match):
            validate_config(load_config(CONFIG_DIR / "qwen2.5-math-7b_steer.yaml", base + extra), check_paths=False)
