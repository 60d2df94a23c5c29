"""The prompt builders, the output contract's parser, and rationales from findings."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_r1.modeling.contract import SYSTEM_PROMPT, completion_text, format_target, parse_completion
from ecg_r1.modeling.findings import format_leads, leads_in_text, parse_leads, rationale_from_findings
from ecg_r1.modeling.notes import is_unreadable, mark_unseen_words, note_vocabulary, note_words
from ecg_r1.modeling.prompts import QUESTION, build_multimodal_prompt, build_prompt, build_sft_messages


class TestParseCompletion:
    @pytest.mark.parametrize("word,answer", [("Yes", True), ("No", False)])
    def test_contract_reads_answer_and_think(self, word, answer):
        parsed = parse_completion(f"<think>TWI in V1-V3.</think><answer>{word}</answer>")
        assert parsed.valid and parsed.answer is answer
        assert parsed.think == "TWI in V1-V3."
        assert parsed.problem is None

    def test_whitespace_around_blocks_and_word_is_accepted(self):
        parsed = parse_completion("\n <think>\nreason\n</think>\n<answer> No </answer>\n")
        assert parsed.valid and parsed.answer is False and parsed.think == "reason"

    def test_empty_think_is_accepted(self):
        assert parse_completion("<think></think><answer>Yes</answer>").valid

    @pytest.mark.parametrize(
        "text,problem",
        [
            ("<think>x</think><answer>Yes or No</answer>", "exactly 'Yes' or 'No'"),
            ("<think>x</think><answer></answer>", "empty answer"),
            ("<think>x</think><answer>  </answer>", "empty answer"),
            ("<think>x</think><answer>Yes</answer><answer>No</answer>", "more than one answer"),
            ("<think>x</think><answer>No</answer> because of V2", "text after </answer>"),
            ("<think>TWI in V1, V2 and", "truncated"),
            ("<think>x</think><answer>Ye", "truncated"),
            ("<think>x</think>", "no <answer>"),
            ("<think>a<think>b</think></think><answer>No</answer>", "think block"),
            ("<think>a</think><answer><answer>No</answer></answer>", "tag"),
            ("<answer>Yes</answer>", "missing <think>"),
            ("Sure! <think>x</think><answer>Yes</answer>", "start with <think>"),
            ("<think>x</think> so <answer>Yes</answer>", "between </think> and <answer>"),
            ("", "empty completion"),
        ],
    )
    def test_known_hacks_are_invalid_with_a_reason(self, text, problem):
        parsed = parse_completion(text)
        assert not parsed.valid
        assert parsed.answer is None and parsed.think is None
        assert problem in parsed.problem

    @pytest.mark.parametrize("word", ["yes", "YES", "no", "Yes.", "Ischemic", "True"])
    def test_answer_is_case_sensitive_and_exact(self, word):
        assert not parse_completion(f"<think>x</think><answer>{word}</answer>").valid

    def test_non_string_is_a_type_error(self):
        with pytest.raises(TypeError):
            parse_completion(None)


class TestFormatTarget:
    @pytest.mark.parametrize("answer", [True, False])
    def test_round_trips_through_the_parser(self, answer):
        parsed = parse_completion(format_target(answer, "T-wave inversion in V1-V4."))
        assert parsed.valid and parsed.answer is answer and parsed.think == "T-wave inversion in V1-V4."

    def test_without_rationale_the_think_block_is_empty(self):
        assert format_target(False) == "<think></think><answer>No</answer>"

    def test_rationale_with_a_contract_tag_is_refused(self):
        with pytest.raises(ValueError, match="must not contain"):
            format_target(True, "see <answer>")


class TestCompletionText:
    def test_reads_trl_conversational_completion(self):
        assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"

    def test_reads_structured_content_and_strings(self):
        assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) == "a"
        assert completion_text("plain") == "plain"

    def test_an_image_part_from_a_dataset_row_adds_no_text(self):
        # A datasets row unifies the parts' fields, so an image part carries "text": None.
        user = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "text": None}]}
        assert completion_text([user]) == "a"

    def test_unknown_shape_is_a_type_error(self):
        with pytest.raises(TypeError):
            completion_text(42)


class TestBuildPrompt:
    def test_grpo_prompt_is_string_content_with_the_clinical_text(self):
        messages = build_prompt(67, "F", "Chest pain for 2 h. Troponin 0.9 ng/mL.")
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[0]["content"] == SYSTEM_PROMPT
        user = messages[1]["content"]
        assert isinstance(user, str)
        assert "67 years" in user and "female" in user and "Troponin 0.9" in user
        assert "ischemic" in user

    def test_missing_fields_say_unknown(self):
        user = build_prompt(float("nan"), None, None)[1]["content"]
        assert "Age: unknown" in user and "Sex: unknown" in user and "none given" in user

    def test_multimodal_prompt_has_one_image_slot_in_the_user_message(self):
        messages = build_multimodal_prompt(50, "M", "note")
        parts = messages[1]["content"]
        assert [p["type"] for p in parts] == ["image", "text"]
        assert all(isinstance(m["content"], list) for m in messages)

    def test_the_page_can_sit_between_the_clinical_details_and_the_question(self):
        for messages in (
            build_prompt(50, "M", "chest pain", "before_question"),
            build_multimodal_prompt(50, "M", "chest pain", "before_question"),
        ):
            parts = messages[1]["content"]
            assert [p["type"] for p in parts] == ["text", "image", "text"]
            assert "chest pain" in parts[0]["text"] and "ischemic" not in parts[0]["text"]
            assert parts[2]["text"] == QUESTION
        first = build_multimodal_prompt(50, "M", "chest pain")[1]["content"]
        assert first[1]["text"] == parts[0]["text"] + parts[2]["text"]  # the same words, moved
        with pytest.raises(ValueError, match="before_question"):
            build_prompt(50, "M", "chest pain", "last")

    def test_note_words_outside_the_vocabulary_are_marked_and_the_rest_kept(self):
        vocabulary = note_vocabulary(["Chest pain, no diabetes. K+ 4.1 mmol/L", None])
        assert vocabulary == {"chest", "pain", "no", "diabetes", "mmol"}
        mixed = "Chest pain at rest, no diabetes. K+ 4,7 mmol/l."  # 2 of 7 words unseen
        assert mark_unseen_words(mixed, vocabulary) == "Chest pain ? ?, no diabetes. K+ 4,7 mmol/l."
        assert mark_unseen_words("Chest PAIN", vocabulary) == "Chest PAIN"  # case-blind match
        assert mark_unseen_words("no pain", frozenset()) == "? ?"  # the training form of an unreadable note
        assert mark_unseen_words(None, vocabulary) is None and mark_unseen_words("", vocabulary) == ""
        assert note_words("Troponin 5 ng/L (K+ 4,1)") == ["troponin", "ng"]

    def test_a_note_with_most_of_its_words_unseen_is_marked_whole(self):
        vocabulary = note_vocabulary(["Chest pain, no diabetes. K+ 4.1 mmol/L"])
        german = "69-jähriger Patient mit Brustschmerz; kein Diabetes. K+ 4,7 mmol/l."  # 5 of 7 unseen
        assert is_unreadable(german, vocabulary)
        # The words it shares with the training notes are marked too: the scrambled training form.
        assert mark_unseen_words(german, vocabulary) == "69-? ? ? ?; ? ?. K+ 4,7 ?/l."
        assert mark_unseen_words(german, vocabulary) == mark_unseen_words(german, frozenset())
        # Half unseen is still read.
        assert not is_unreadable("chest kein", vocabulary)
        assert mark_unseen_words("chest kein", vocabulary) == "chest ?"
        assert mark_unseen_words("chest kein schmerz", vocabulary) == "? ? ?"
        assert not is_unreadable(None, vocabulary) and not is_unreadable("4,5 / 3", vocabulary)

    def test_sft_messages_end_with_the_target(self):
        target = format_target(True, "x")
        messages = build_sft_messages(50, "M", "note", target)
        assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": target}]}
        assert all(isinstance(m["content"], list) for m in messages)


class TestLeads:
    def test_leads_in_text_expands_ranges_and_respects_boundaries(self):
        assert leads_in_text("TWI in V2-V4 and AVL, not II; V10 is no lead") == {
            "V2",
            "V3",
            "V4",
            "aVL",
            "II",
        }

    def test_leads_in_text_reads_limb_leads_exactly(self):
        assert leads_in_text("inverted T in III and aVF") == {"III", "aVF"}
        assert leads_in_text("no leads here") == set()

    def test_parse_leads_orders_and_deduplicates(self):
        assert parse_leads("V2, avl,I,V2") == ["I", "aVL", "V2"]
        assert parse_leads(None) == [] and parse_leads("") == []

    def test_parse_leads_refuses_unknown_names(self):
        with pytest.raises(ValueError, match="unknown lead"):
            parse_leads("V1,V9")

    def test_format_leads_writes_runs_as_ranges(self):
        assert format_leads(["I", "aVL", "V1", "V2", "V3", "V4", "V6"]) == "I, aVL, V1-V4, V6"
        assert format_leads(["V5", "V6"]) == "V5, V6"


class TestRationaleFromFindings:
    def test_names_the_leads_and_territory(self):
        text = rationale_from_findings("V1,V2,V3,V4")
        assert text.startswith("T-wave inversion in V1-V4 (anterior).")
        assert leads_in_text(text) == {"V1", "V2", "V3", "V4"}

    def test_adds_measured_features_and_skips_missing(self):
        row = {
            "qrs_ms": 132,
            "st_V5": -0.12,
            "st_V2": 0.02,
            "t_amp_II": -0.3,
            "t_amp_III": -0.5,
            "qt_ms": None,
        }
        text = rationale_from_findings(["II", "III", "aVF"], row)
        assert "(inferior)" in text and "Wide QRS." in text
        assert "ST depression." in text and "ST elevation" not in text
        assert "Deep inverted T waves." in text and "QT" not in text and "rate" not in text

    def test_reads_a_measure_features_row_and_names_only_the_twi_leads(self):
        from ecg_r1.data.features import measure_features

        t = np.arange(5000) / 500
        beat = np.zeros(5000)
        for r in np.arange(0.5, 10, 1.0):  # 60 bpm: a QRS spike and an inverted T after it
            beat += 1.2 * np.exp(-(((t - r) / 0.012) ** 2)) - 0.4 * np.exp(-(((t - r - 0.3) / 0.05) ** 2))
        signals = np.tile(beat, (1, 12, 1)).astype(np.float32)
        row = measure_features(signals).row(0, named=True)
        text = rationale_from_findings(row["twi_leads"], row)
        assert "Normal rate." in text and "Shallow inverted T waves" in text and "symmetric" in text
        assert "Narrow QRS." in text and "Normal QT." in text
        assert leads_in_text(text) == set(parse_leads(row["twi_leads"]))

    def test_without_findings_says_so(self):
        assert "No lead-level" in rationale_from_findings(None)

    def test_never_states_the_answer(self):
        text = rationale_from_findings("V1,V2", {"st_V2": 0.3, "t_sym_V2": 1.0})
        assert "ischemic" not in text.lower() and "yes" not in text.lower()
