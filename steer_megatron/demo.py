"""`make demo` entry point: the STEER loss end to end on a tiny megatron-core model at TP = 2 (CPU).

Until the full GRPO/STEER trainer lands, this runs the loss path the trainer uses: a GPTModel with
vocab-parallel logits over two gloo ranks, token statistics merged by one all-gather, STEER weights
and the dual-clip loss, megatron's backward, an optimizer step. It prints per-step metrics.
"""
from __future__ import annotations

import time

import torch

from steer_megatron.loss import PolicyLossConfig, PolicyLossInputs, get_policy_loss, padded_vocab_size, token_stats
from steer_megatron.parallel import ParallelLayout, init_parallel, spawn_ranks

VOCAB, STEPS = 1000, 8


def _model(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
        tensor_model_parallel_size=tp, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
    )
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=padded_vocab_size(VOCAB, tp),
                    max_sequence_length=128, position_embedding_type="rope")


def _rank(tp: int) -> list[dict]:
    init_parallel(ParallelLayout(tp=tp), seed=0)
    from megatron.core import parallel_state as ps

    model = _model(tp)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (8, 48), generator=g)
    adv = torch.randn(8, 1, generator=g).expand(8, 47).contiguous()  # one advantage per sequence
    mask = torch.ones(8, 47, dtype=torch.bool)
    mask[:, :16] = False  # the prompt part carries no loss
    pos = torch.arange(48)[None].expand_as(ids)
    group = ps.get_tensor_model_parallel_group()
    loss_fn, cfg = get_policy_loss("steer"), PolicyLossConfig()
    with torch.no_grad():  # the "old policy" pass: log-probs and entropy before any update
        old = token_stats(model(ids, pos, None)[:, :-1], ids[:, 1:], vocab_size=VOCAB, tp_group=group)
    rows = []
    for step in range(STEPS):
        t0 = time.perf_counter()
        st = token_stats(model(ids, pos, None)[:, :-1], ids[:, 1:], vocab_size=VOCAB, tp_group=group)
        inp = PolicyLossInputs(log_prob=st.logprob, old_log_prob=old.logprob, advantages=adv, mask=mask,
                               entropy=st.entropy, old_entropy=old.entropy)
        loss, metrics = loss_fn(inp, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0,
                     **{k: metrics[k].item() for k in ("entropy_mean", "weight_mean", "weight_min", "clipfrac_high", "clipfrac_low")}})
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print("[bold]steer-megatron demo[/]: STEER loss on a megatron-core GPTModel, TP=2 over gloo (CPU)")
    rows = spawn_ranks(_rank, 2, 2)[0]
    table = Table("step", "loss", "entropy", "w mean", "w min", "clip hi", "clip lo", "s")
    for r in rows:
        table.add_row(str(r["step"]), f"{r['loss']:+.4f}", f"{r['entropy_mean']:.3f}", f"{r['weight_mean']:.3f}",
                      f"{r['weight_min']:.3f}", f"{r['clipfrac_high']:.3f}", f"{r['clipfrac_low']:.3f}", f"{r['seconds']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
