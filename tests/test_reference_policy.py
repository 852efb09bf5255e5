"""The frozen reference policy behind `algorithm.kl_coef > 0`: its log-probs equal transformers'
on the same HF weights at TP=2, and the trainer runs with a KL penalty to it."""
from pathlib import Path

import torch

from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks
from tests.models_helpers import TINY, hf_logits, make_hf_model


def _reference_worker(hf_dir: str, ids: torch.Tensor):
    from steer_megatron.loss import PolicyLossConfig
    from steer_megatron.models.hf_config import build_gpt_model, parse_hf_config
    from steer_megatron.train.actor import ActorBatch, ActorConfig
    from steer_megatron.train.reference import ReferencePolicy

    init_parallel(ParallelLayout(tp=2), seed=1)
    arch = parse_hf_config(hf_dir)
    _, vocab = build_gpt_model(arch)
    cfg = ActorConfig(vocab_size=vocab.size, micro_batch_size=2, mini_batch_size=4, loss=PolicyLossConfig())
    ref = ReferencePolicy.build(arch, hf_dir, params_dtype=torch.float32, padded_vocab=vocab.padded_size, cfg=cfg, seed=1)
    assert not any(p.requires_grad for p in ref._actor.model.parameters())
    return ref.log_probs(ActorBatch(input_ids=ids, loss_mask=torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)))


def test_reference_log_probs_equal_transformers_at_tp2(tmp_path):
    hf_dir = make_hf_model(str(tmp_path / "hf"))
    ids = torch.randint(0, TINY["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(0))
    got = spawn_ranks(_reference_worker, 2, hf_dir, ids)
    want = torch.log_softmax(hf_logits(hf_dir, ids).double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    for lp in got:  # both TP ranks hold the full statistics
        # fp32 forward of two implementations: log-softmax of O(1) logits agrees to ~1e-6
        torch.testing.assert_close(lp.double(), want, atol=2e-5, rtol=0)
