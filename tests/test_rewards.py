"""Reward functions: the known GRPO hacks score nothing, and the registry resolves every name."""

from __future__ import annotations

import pickle

import pytest

from ecg_r1.training.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    format_reward,
    get_grounding_reward,
    get_reward_funcs,
    grounding_reward,
    label_answer,
    lead_overlap,
)


def conv(text: str) -> list[dict]:
    """A completion as TRL 1.16 passes it for conversational prompts."""
    return [{"role": "assistant", "content": text}]


GOOD_YES = "<think>T-wave inversion in V1-V4.</think><answer>Yes</answer>"
GOOD_NO = "<think>T-wave inversion in V1-V4.</think><answer>No</answer>"
HACKS = {
    "yes_or_no": "<think>x</think><answer>Yes or No</answer>",
    "empty_answer": "<think>x</think><answer></answer>",
    "two_answers": "<think>x</think><answer>Yes</answer><answer>No</answer>",
    "text_after_answer": "<think>x</think><answer>Yes</answer> Final answer: Yes",
    "truncated": "<think>T-wave inversion in V1, V2 and",
    "lowercase": "<think>x</think><answer>yes</answer>",
    "nested_tags": "<think><think>x</think></think><answer>Yes</answer>",
    "no_think": "<answer>Yes</answer>",
}


class TestFormatReward:
    def test_valid_completion_scores_one(self):
        assert format_reward([conv(GOOD_YES), conv(GOOD_NO)]) == [1.0, 1.0]

    @pytest.mark.parametrize("name", sorted(HACKS))
    def test_known_hacks_score_zero(self, name):
        assert format_reward([conv(HACKS[name])]) == [0.0]

    def test_whitespace_around_blocks_still_scores_one(self):
        assert format_reward([conv("  <think>a</think>\n<answer> Yes </answer>\n")]) == [1.0]

    def test_plain_string_completions_are_accepted(self):
        assert format_reward([GOOD_YES, HACKS["two_answers"]]) == [1.0, 0.0]

    def test_extra_columns_are_ignored(self):
        assert format_reward([conv(GOOD_YES)], label=["ischemic"], hospital=["A"]) == [1.0]


class TestAccuracyReward:
    def test_exact_match_scores_one_and_mismatch_zero(self):
        rewards = accuracy_reward([conv(GOOD_YES), conv(GOOD_NO)], label=["ischemic", "ischemic"])
        assert rewards == [1.0, 0.0]

    def test_no_for_non_ischemic(self):
        assert accuracy_reward([conv(GOOD_NO)], label=["non-ischemic"]) == [1.0]

    @pytest.mark.parametrize("name", sorted(HACKS))
    def test_known_hacks_score_zero_even_when_the_word_is_there(self, name):
        assert accuracy_reward([conv(HACKS[name])], label=["ischemic"]) == [0.0]

    def test_unlabelled_cases_are_skipped_with_none(self):
        rewards = accuracy_reward([conv(GOOD_YES)] * 3, label=["unknown", None, True])
        assert rewards == [None, None, 1.0]

    def test_one_label_per_completion_is_required(self):
        with pytest.raises(ValueError, match="one per completion"):
            accuracy_reward([conv(GOOD_YES)] * 2, label=["ischemic"])

    def test_unreadable_label_is_an_error_not_a_zero(self):
        with pytest.raises(ValueError, match="cannot read label"):
            accuracy_reward([conv(GOOD_YES)], label=["maybe"])


class TestLabelAnswer:
    @pytest.mark.parametrize(
        "label,expected",
        [
            ("ischemic", True),
            ("non-ischemic", False),
            ("unknown", None),
            (None, None),
            (1, True),
            (False, False),
        ],
    )
    def test_reads_cohort_labels_and_booleans(self, label, expected):
        assert label_answer(label) is expected


class TestGroundingReward:
    def test_exact_leads_score_one(self):
        assert grounding_reward([conv(GOOD_YES)], twi_leads=["V1,V2,V3,V4"]) == [1.0]

    def test_partial_overlap_is_f1(self):
        # named {V1..V4}, truth {V3, V4, V5, V6}: 2 hits -> F1 = 2*2/(4+4) = 0.5
        assert grounding_reward([conv(GOOD_NO)], twi_leads=["V3,V4,V5,V6"]) == [0.5]

    def test_naming_every_lead_is_penalised(self):
        everything = "<think>I II III aVR aVL aVF V1 V2 V3 V4 V5 V6</think><answer>Yes</answer>"
        [reward] = grounding_reward([conv(everything)], twi_leads=["V2"])
        assert reward == pytest.approx(2 / 13)

    def test_invalid_completion_scores_zero(self):
        assert grounding_reward([conv(HACKS["truncated"])], twi_leads=["V1,V2"]) == [0.0]

    def test_cases_without_known_leads_are_skipped(self):
        assert grounding_reward([conv(GOOD_YES)] * 2, twi_leads=["", None]) == [None, None]

    def test_jaccard_variant_and_name(self):
        jaccard = get_grounding_reward("jaccard")
        assert jaccard([conv(GOOD_NO)], twi_leads=["V3,V4,V5,V6"]) == [pytest.approx(2 / 6)]
        assert jaccard.__name__ == "grounding_jaccard_reward"
        assert grounding_reward.__name__ == "grounding_reward"

    def test_unknown_metric_is_refused(self):
        with pytest.raises(ValueError, match="metric"):
            get_grounding_reward("dice")

    def test_pickles_for_multiprocess_trainers(self):
        restored = pickle.loads(pickle.dumps(get_grounding_reward("jaccard")))
        assert restored([GOOD_NO], twi_leads=["V3,V4,V5,V6"]) == [pytest.approx(2 / 6)]


class TestLeadOverlap:
    def test_no_hit_is_zero(self):
        assert lead_overlap(set(), {"V1"}) == 0.0
        assert lead_overlap({"I"}, {"V1"}, "jaccard") == 0.0


class TestRegistry:
    def test_every_name_resolves_to_a_callable_with_a_name(self):
        for name, func in zip(REWARD_FUNCS, get_reward_funcs(list(REWARD_FUNCS)), strict=True):
            assert callable(func) and func is REWARD_FUNCS[name]
            assert func.__name__.endswith("_reward")
            assert len(func([conv(GOOD_YES)], label=["ischemic"], twi_leads=["V1"])) == 1

    def test_order_is_kept(self):
        assert get_reward_funcs(["accuracy", "format"]) == [accuracy_reward, format_reward]

    def test_unknown_name_lists_the_known_ones(self):
        with pytest.raises(ValueError, match="known rewards"):
            get_reward_funcs(["format", "length"])

    def test_profile_reward_names_resolve(self):
        from ecg_r1.modeling.profiles import available_profiles, load_profile

        for profile in available_profiles():
            assert len(get_reward_funcs(load_profile(profile).reward_names)) == len(
                load_profile(profile).rewards
            )
