"""The CPU engine's sampling against independent references: transformers' greedy
generate and the model's own log_softmax."""
from __future__ import annotations

import pytest
import torch

from steer_megatron.rollout.cpu_engine import CpuEngine, SeqRequest, derive_seed
from tests.fixtures_models import hf_logprob_scorer
from tests.rollout_helpers import tiny_model_dir

PROMPTS = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [200, 3, 4]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return CpuEngine(str(tiny_model_dir(tmp_path_factory)))


def run(engine, **kw):
    seqs = [SeqRequest(rid=f"r{i}", prompt=p, **kw) for i, p in enumerate(PROMPTS)]
    engine.generate(seqs)
    return seqs


def test_greedy_equals_transformers_generate(engine):
    seqs = run(engine, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    for s in seqs:
        ref = engine.model.generate(torch.tensor([s.prompt]), do_sample=False, max_new_tokens=12,
                                    min_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert s.output_ids == ref[0, len(s.prompt):].tolist()
        assert s.finish == {"type": "length", "length": 12}


@pytest.mark.parametrize("temperature, original", [(0.0, False), (1.0, False), (0.7, True)])
def test_logprobs_equal_log_softmax(engine, temperature, original):
    engine.return_original_logprob = original
    try:
        seqs = run(engine, max_new_tokens=10, temperature=temperature, ignore_eos=True)
    finally:
        engine.return_original_logprob = False
    ref = hf_logprob_scorer(engine.model)([s.prompt for s in seqs], [s.output_ids for s in seqs])
    for s, r in zip(seqs, ref):
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(r), atol=1e-5, rtol=0)


@torch.no_grad()
def test_logprobs_follow_sglang_temperature_rule(engine):
    """SGLang's default (no SGLANG_RETURN_ORIGINAL_LOGPROB): log_softmax(logits / T)."""
    seqs = run(engine, max_new_tokens=6, temperature=0.5, ignore_eos=True)
    for s in seqs:
        logits = engine.model(torch.tensor([s.prompt + s.output_ids])).logits[0].float()
        lp = torch.log_softmax(logits / 0.5, dim=-1)
        ref = [float(lp[len(s.prompt) - 1 + k, t]) for k, t in enumerate(s.output_ids)]
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(ref), atol=1e-5, rtol=0)


def test_stop_token_and_length_finish_reasons(engine):
    greedy = run(engine, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    stop = greedy[0].output_ids[4]
    first = greedy[0].output_ids.index(stop)
    seqs = run(engine, max_new_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
    assert seqs[0].output_ids == greedy[0].output_ids[: first + 1]  # the stop token is kept
    assert seqs[0].finish == {"type": "stop", "matched": stop}
    for g, s in zip(greedy[1:], seqs[1:]):
        if stop not in g.output_ids:
            assert s.finish == {"type": "length", "length": 12} and len(s.output_ids) == 12
    # min_new_tokens masks the stop token until it is reached
    late = run(engine, max_new_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,), min_new_tokens=first + 2)
    assert len(late[0].output_ids) >= first + 2 and stop not in late[0].output_ids[: first + 2]


def test_eos_stops_unless_ignored(engine):
    eos = engine.eos_ids[0]
    seq = SeqRequest(rid="e", prompt=[5, 6], max_new_tokens=40, temperature=1.0, seed=3)
    # Force EOS: bias the lm_head so EOS dominates, then restore.
    head = engine.model.lm_head.weight
    saved = head[eos].clone()
    with torch.no_grad():
        head[eos] = engine.model.model.embed_tokens.weight.mean(0) * 0 + 10.0
    try:
        engine.generate([seq])
        ignored = SeqRequest(rid="e", prompt=[5, 6], max_new_tokens=3, temperature=1.0, seed=3, ignore_eos=True)
        engine.generate([ignored])
    finally:
        with torch.no_grad():
            head[eos] = saved
    assert seq.finish == {"type": "stop", "matched": eos} and seq.output_ids[-1] == eos
    assert ignored.finish["type"] == "length" and len(ignored.output_ids) == 3


def test_sampling_is_deterministic_per_seed_and_batch_independent(engine):
    def sample(seed, prompts):
        seqs = [SeqRequest(rid="x", prompt=p, max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9,
                           seed=derive_seed("x", 0, seed), ignore_eos=True) for p in prompts]
        engine.generate(seqs)
        return [s.output_ids for s in seqs]

    alone = sample(7, [PROMPTS[0]])[0]
    assert sample(7, [PROMPTS[0]])[0] == alone
    assert sample(7, [PROMPTS[2], PROMPTS[0]])[1] == alone  # another batch around it
    assert sample(8, [PROMPTS[0]])[0] != alone


def test_top_k_one_is_greedy(engine):
    greedy = run(engine, max_new_tokens=6, temperature=0.0, ignore_eos=True)
    topk1 = run(engine, max_new_tokens=6, temperature=1.0, top_k=1, ignore_eos=True)
    assert [s.output_ids for s in greedy] == [s.output_ids for s in topk1]


def test_disk_load_is_strict(engine, tmp_path, tmp_path_factory):
    from steer_megatron.rollout.weight_sync import write_hf_checkpoint

    src = tiny_model_dir(tmp_path_factory)
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    partial, _ = write_hf_checkpoint(((k, v) for k, v in state.items() if k != "lm_head.weight"), tmp_path / "p", src)
    with pytest.raises(KeyError, match="lacks 1 weights.*lm_head.weight"):
        engine.load_weights_from_disk(str(partial))
    extra, _ = write_hf_checkpoint(list(state.items()) + [("bogus.weight", torch.zeros(1))], tmp_path / "x", src)
    with pytest.raises(KeyError, match="bogus.weight"):
        engine.load_weights_from_disk(str(extra))
    bad = dict(state, **{"lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="lm_head.weight: shape"):
        engine.load_state(bad)
    assert torch.equal(engine.model.lm_head.weight, state["lm_head.weight"])  # nothing half-loaded
