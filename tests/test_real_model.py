"""A real pretrained LM (SmolLM2-135M-Instruct: Llama, 30 layers, 9 heads / 3 KV heads, 49,152
tokens, tied embeddings) through the HF <-> Megatron path at TP=3 (no padding, and a forced
larger padded vocabulary), PP=2 and TP=3 x PP=2, on real chat-templated prompts:
- Megatron logits equal transformers' within fp32 summation-order error (logit_rtol);
- token_stats on the TP=3 vocab shards equals a float64 reference on the same logits, padded
  columns excluded;
- HF -> dist checkpoint (TP=3) -> HF is bitwise; the export loads in transformers and the CPU
  rollout server's greedy tokens equal transformers' generate up to the first near-tie.
"""
from __future__ import annotations

import math

import pytest
import torch

from steer_megatron.parallel import spawn_ranks
from tests.models_helpers import assert_bitwise_equal, hf_logits
from tests.real_model_helpers import EPS32, chat_ids, logit_rtol, smollm2_or_skip, stream_roundtrip, tp_logits_and_stats

PADDED = 49152 + 3 * 128  # a forced larger padded vocabulary: 384 padding columns on TP rank 2


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from transformers import AutoTokenizer

    from steer_megatron.models import parse_hf_config

    hf_dir = smollm2_or_skip()
    prompts = chat_ids(AutoTokenizer.from_pretrained(hf_dir))
    width = min(len(p) for p in prompts[:2])
    ids = torch.tensor([p[:width] for p in prompts[:2]])  # megatron's RoPE wants no left padding
    return dict(dir=hf_dir, arch=parse_hf_config(hf_dir), prompts=prompts, ids=ids, ref=hf_logits(hf_dir, ids))


def _check_logits(real, got: torch.Tensor, what: str) -> None:
    ref = real["ref"]
    rel = float((got - ref).abs().max() / ref.abs().max())
    tol = logit_rtol(real["arch"].num_layers, real["arch"].hidden_size)
    print(f"\n{what}: relative logit difference {rel:.2e} (tolerance {tol:.2e}, max |logit| {float(ref.abs().max()):.1f})")
    assert rel <= tol, f"{what}: max |megatron - transformers| / max |logit| = {rel:.2e} > {tol:.2e}"


def test_tp3_logits_and_token_stats_match_references(real):
    per_rank = spawn_ranks(tp_logits_and_stats, 3, real["dir"], 3, 1, real["ids"], (None, PADDED))
    for i, padded in enumerate((None, PADDED)):
        _check_tp3(real, [r[i] for r in per_rank], padded)


def _check_tp3(real, results, padded):
    r = results[0]
    assert r["padded_size"] == (padded or 49152)
    _check_logits(real, r["logits"], f"tp=3 padded={padded}")
    if padded:  # padding rows of the output layer are zero, so their logits are exactly zero
        assert r["padding"].shape[-1] == padded - 49152 and not r["padding"].any()
    # float64 reference on the very logits token_stats saw (padded columns excluded)
    z = r["logits"][:, :-1].double()
    logp = torch.log_softmax(z, dim=-1)
    target = real["ids"][:, 1:]
    ref_logprob = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(logp.exp() * logp).sum(-1)
    # fp32 accumulation: log Z and sum p z carry ~eps * max|z| each, over a 49k-term sum
    # (random walk: sqrt(V)); a missed or extra column shows up at O(p) instead.
    tol = EPS32 * float(z.abs().max()) * math.sqrt(z.shape[-1])
    errs = [float((r[k].double() - ref).abs().max()) for k, ref in (("logprob", ref_logprob), ("entropy", ref_entropy))]
    print(f"token_stats padded={padded}: |logprob - fp64| {errs[0]:.2e}, |entropy - fp64| {errs[1]:.2e} (tolerance {tol:.2e})")
    assert max(errs) <= tol
    for other in results[1:]:  # every TP rank holds the same merged statistics
        assert torch.equal(other["entropy"], r["entropy"]) and torch.equal(other["logprob"], r["logprob"])


@pytest.mark.extended
@pytest.mark.slow  # 2 and 6 ranks of a 30-layer model: ~50 s and ~140 s on 2 busy cores
@pytest.mark.parametrize("tp, pp", [(1, 2), (3, 2)], ids=["pp2", "tp3_pp2"])
def test_pipeline_logits_match_transformers(real, tp, pp):
    last = spawn_ranks(tp_logits_and_stats, tp * pp, real["dir"], tp, pp, real["ids"])[-1][0]
    _check_logits(real, last["logits"], f"tp={tp} pp={pp}")


def _generate_reference(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits, dim=1)[0].float()


@pytest.fixture(scope="module")
def export(real, tmp_path_factory):
    """HF -> dist checkpoint prepared for TP=3 -> HF (the streaming converters), timed."""
    root = tmp_path_factory.mktemp("roundtrip")
    out = str(root / "export")
    timing = spawn_ranks(stream_roundtrip, 1, real["dir"], str(root / "ckpt"), out, 3)[0]
    print(f"\nHF -> Megatron (tp=3) {timing['to_megatron_s']:.1f} s, back {timing['to_hf_s']:.1f} s")
    return out


@pytest.fixture(scope="module")
def fleet(export, tmp_path_factory):
    from steer_megatron.parallel import free_port_block
    from steer_megatron.rollout import Fleet, FleetConfig

    cfg = FleetConfig(model_path=export, num_workers=1, engine="cpu", base_port=free_port_block(1), use_router=False,
                      cpu_threads=2, log_dir=str(tmp_path_factory.mktemp("logs")), startup_timeout_s=600)
    with Fleet(cfg) as f:
        yield f


def test_roundtrip_bitwise_export_loads_and_greedy_rollout_matches(real, export, fleet):
    from transformers import AutoModelForCausalLM

    from steer_megatron.rollout import http

    assert_bitwise_equal(real["dir"], export)
    n_new = 16
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    refs = [_generate_reference(model, p, n_new) for p in real["prompts"]]
    answer = http.call("POST", f"{fleet.live_urls[0]}/generate", {
        "input_ids": real["prompts"], "return_logprob": True,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": n_new, "ignore_eos": True},
    }, timeout=300)
    compared = 0
    for row, (item, (ref_ids, ref_logits)) in enumerate(zip(answer, refs)):
        got = item["output_ids"]
        served_lp = [e[0] for e in item["meta_info"]["output_token_logprobs"]]
        ref_lp = torch.log_softmax(ref_logits.double(), -1)
        k = next((i for i, (a, b) in enumerate(zip(got, ref_ids)) if a != b), len(ref_ids))
        # the measured difference between the two implementations on the tokens they agree on
        diff = max((abs(served_lp[i] - float(ref_lp[i, t])) for i, t in enumerate(ref_ids[:k])), default=0.0)
        bound = logit_rtol(real["arch"].num_layers, real["arch"].hidden_size) * float(ref_logits.abs().max())
        assert diff <= bound, f"row {row}: served vs transformers log-prob differ by {diff:.2e} > {bound:.2e}"
        if k < len(ref_ids):
            # a flip is allowed only at a near-tie: the two leading logits closer than the two
            # implementations' measured disagreement (each of the two tokens may move by it)
            top2 = torch.topk(ref_logits[k], 2).values
            gap = float(top2[0] - top2[1])
            assert gap <= 2 * diff, (f"row {row}: greedy tokens differ at step {k} ({got[k]} vs {ref_ids[k]}) "
                                     f"where the top-2 gap {gap:.2e} exceeds 2 x measured difference {diff:.2e}")
        compared += k
        print(f"row {row}: {k} of {n_new} greedy tokens equal, served vs transformers log-prob {diff:.2e}")
    assert compared >= len(refs) * n_new // 2, f"only {compared} tokens compared before near-ties"


def _sign_step(model, prompts, lr: float) -> dict[str, torch.Tensor]:
    """The weights after one Adam-like first step (lr * sign of the gradient of the greedy
    completions' NLL): what the trainer holds after a real update."""
    with torch.no_grad():
        seqs = [(p, model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()) for p in prompts]
    model.zero_grad()
    for p, c in seqs:
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        (-logp[torch.arange(len(p) - 1, len(p) - 1 + len(c)), torch.tensor(c)].sum()).backward()
    with torch.no_grad():
        for w in model.parameters():
            w -= lr * w.grad.sign()
    model.zero_grad()
    return {n: w.detach().clone() for n, w in model.named_parameters()}  # tied lm_head: once


def test_parity_probe_tolerance_passes_a_correct_sync_and_fails_a_wrong_tensor(real, export, fleet):
    """The derived tolerance (rollout.parity_atol=null) on a 30-layer fp32 model: a correct
    weight sync passes, a tensor left out of the sync or two tensors swapped fail."""
    from transformers import AutoModelForCausalLM

    from steer_megatron.parallel import free_port_block
    from steer_megatron.rollout.weight_sync import NcclWeightSync, ParityError, ParityProbe
    from steer_megatron.rollout.weight_sync.base import parity_tolerance
    from tests.fixtures_models import hf_logprob_scorer

    atol = parity_tolerance(torch.float32, real["arch"].num_layers, real["arch"].hidden_size)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    state = _sign_step(model, real["prompts"][:2], lr=1e-5)  # model is now the trainer after the step
    probe = ParityProbe(tuple(tuple(p) for p in real["prompts"][:2]), hf_logprob_scorer(model.eval()), atol=atol)
    sync = NcclWeightSync(fleet, master_address="127.0.0.1", master_port=free_port_block(2), backend="gloo",
                          bucket_bytes=64 << 20, probe=probe, timeout_s=300)
    report = sync.sync(list(state.items()), version=1)
    print(f"\nparity after a correct sync: {report.parity.max_abs_diff:.2e} (tolerance {atol:.2e})")
    assert report.parity.max_abs_diff <= atol

    state = _sign_step(model, real["prompts"][:2], lr=1e-5)  # the next step, with one tensor left out:
    stale = "model.layers.15.mlp.down_proj.weight"  # the server keeps its previous value
    with pytest.raises(ParityError, match="parity failed"):
        sync.sync([(n, t) for n, t in state.items() if n != stale], version=2)
    a, b = "model.layers.10.mlp.down_proj.weight", "model.layers.11.mlp.down_proj.weight"
    swapped = dict(state, **{a: state[b], b: state[a]})
    with pytest.raises(ParityError, match="parity failed"):
        sync.sync(list(swapped.items()), version=3)
