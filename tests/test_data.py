"""RL parquet loading (real DAPO slice + malformed rows) and the resumable sampler."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steer_megatron.data import LoadReport, MalformedRowError, ResumableSampler, load_rl_parquets
from steer_megatron.demo_assets.tokenizer import build_char_tokenizer

DAPO = "/work/shared/datasets/DAPO-Math-17k.parquet"
# The char tokenizer's ChatML overhead around one user message: <|im_start|> "user\n" ... <|im_end|> "\n"
# <|im_start|> "assistant\n" = 1 + 5 + 1 + 1 + 1 + 10 tokens.
TEMPLATE_OVERHEAD = 19


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _row(i, prompt=None, gt="42", ds="math_dapo"):
    return {
        "data_source": ds,
        "prompt": [{"role": "user", "content": f"question {i}"}] if prompt is None else prompt,
        "ability": "MATH",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": i},
    }


def test_real_dapo_slice_filters_by_length_and_says_so(tok, caplog):
    limit = 450
    rows = pq.read_table(DAPO).slice(0, 200).to_pylist()
    want_kept = [r for r in rows if len(r["prompt"][0]["content"]) + TEMPLATE_OVERHEAD <= limit]
    assert 0 < len(want_kept) < len(rows)  # the slice exercises both sides of the limit
    with caplog.at_level("INFO"):
        ex, rep = load_rl_parquets([DAPO], tok, max_prompt_len=limit, max_rows=200)
    assert rep == LoadReport(rows=200, kept=len(want_kept), malformed=0, too_long=200 - len(want_kept))
    assert [e.ground_truth for e in ex] == [r["reward_model"]["ground_truth"] for r in want_kept]
    assert [e.index for e in ex] == [r["extra_info"]["index"] for r in want_kept]
    assert f"dropped {200 - len(want_kept)} of 200 prompts longer than data.max_prompt_len={limit}" in caplog.text
    k = next(i for i, r in enumerate(want_kept) if r["prompt"][0]["content"].isascii())
    text = want_kept[k]["prompt"][0]["content"]
    assert tok.decode(ex[k].prompt_ids) == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "bad, column",
    [
        (_row(2, prompt=[]), "prompt: expected a non-empty list"),
        (_row(2, prompt=[{"role": "user", "content": None}]), "prompt[0]: expected {role: str, content: str}"),
        (_row(2, gt=None), "reward_model.ground_truth: expected a string"),
        (_row(2, gt="  "), "reward_model.ground_truth: empty string"),
        (_row(2, ds=""), "data_source: expected a non-empty string"),
    ],
)
def test_malformed_row_names_file_row_and_column(tmp_path, tok, bad, column):
    path = tmp_path / "bad.parquet"
    rows = [_row(0), _row(1), bad, _row(3)]
    # pyarrow needs one schema: build from good rows, then let it coerce the odd one (nulls)
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(MalformedRowError) as err:
        load_rl_parquets([path], tok, max_prompt_len=100)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and column in msg and "data.on_malformed=skip" in msg
    ex, rep = load_rl_parquets([path], tok, max_prompt_len=100, on_malformed="skip")
    assert [e.index for e in ex] == [0, 1, 3] and rep.malformed == 1 and rep.kept == 3


def test_missing_column_is_named(tmp_path, tok):
    path = tmp_path / "nocol.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "x", "prompt": [{"role": "user", "content": "q"}]}]), path)
    with pytest.raises(MalformedRowError, match=r"missing column\(s\) \['reward_model'\]"):
        load_rl_parquets([path], tok, max_prompt_len=100)


def test_all_prompts_too_long_is_an_error(tmp_path, tok):
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.Table.from_pylist([_row(0)]), path)
    with pytest.raises(ValueError, match="no usable prompts"):
        load_rl_parquets([path], tok, max_prompt_len=5)


def test_sampler_epochs_are_seeded_permutations():
    items = list(range(10))
    s = ResumableSampler(items, seed=3)
    first, second = s.next_batch(10), s.next_batch(10)
    assert sorted(first) == items and sorted(second) == items and first != second
    assert ResumableSampler(items, seed=3).next_batch(20) == first + second  # batches span epochs
    assert ResumableSampler(items, seed=4).next_batch(10) != first
    assert ResumableSampler(items, seed=3, shuffle=False).next_batch(12) == items + [0, 1]


def test_sampler_resume_continues_the_same_order():
    items = list(range(7))
    ref = ResumableSampler(items, seed=1)
    full = [ref.next_batch(3) for _ in range(6)]
    s = ResumableSampler(items, seed=1)
    for _ in range(4):
        s.next_batch(3)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5  # 12 items taken: epoch 0 (7) + 5
    resumed = ResumableSampler(items, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(3) for _ in range(2)] == full[4:]
    with pytest.raises(ValueError, match="num_items"):
        ResumableSampler(items[:-1], seed=1).load_state_dict(state)
