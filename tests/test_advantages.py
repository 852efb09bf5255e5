"""GRPO advantages and dynamic sampling against hand-computed / numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_megatron.algorithms import (
    broadcast_to_tokens,
    fill_with_informative_groups,
    grpo_advantages,
    informative_groups,
)


def test_grpo_hand_computed():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3)
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    s = (1 / 3) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]]))
    torch.testing.assert_close(grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), norm_by_std=False),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_grpo_matches_numpy_reference():
    rng = np.random.default_rng(0)
    r = rng.integers(0, 2, size=(16, 8)).astype(np.float64) + rng.normal(0, 0.1, size=(16, 8))
    ref = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(grpo_advantages(torch.tensor(r)).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_all_equal_group_has_zero_advantage():
    adv = grpo_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 3))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[num_groups, n >= 2\]"):
        grpo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="3 values for 2 sequences"):
        broadcast_to_tokens(torch.ones(3), torch.ones(2, 5))


def test_broadcast_to_tokens_respects_mask():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def _fake_generator(pattern):
    """Groups numbered in draw order; group k is informative iff pattern(k)."""
    state = {"next": 0, "calls": []}

    def generate(num):
        ids = list(range(state["next"], state["next"] + num))
        state["next"] += num
        state["calls"].append(num)
        rewards = torch.tensor([[1.0, 0.0] if pattern(k) else [1.0, 1.0] for k in ids])
        return ids, rewards

    return generate, state


def test_informative_groups():
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert informative_groups(r).tolist() == [False, True, False]


def test_dynamic_sampling_refills_with_informative_groups_in_order():
    gen, state = _fake_generator(lambda k: k % 3 == 0)  # one group in three is informative
    res = fill_with_informative_groups(gen, 4, max_rounds=10)
    assert res.groups == [0, 3, 6, 9] and not res.gave_up
    # round 1 asks for 4 and keeps {0, 3}; keep rate 1/2 -> round 2 asks 2 / (1/2) = 4 -> {6}; ...
    assert state["calls"][:2] == [4, 4]
    assert res.dropped == sum(state["calls"]) - res.kept


def test_dynamic_sampling_gives_up_with_a_message():
    gen, state = _fake_generator(lambda k: False)
    res = fill_with_informative_groups(gen, 4, max_rounds=3)
    assert res.gave_up and res.groups == [] and res.rounds == 3 and res.dropped == 12
    assert "gave up after 3 rounds" in res.message and "max_rounds" in res.message
