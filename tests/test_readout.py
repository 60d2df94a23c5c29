"""The SFT answer read-out re-fit: the fit, the output rows it sets, and the hidden state it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecg_r1.modeling import inference
from ecg_r1.modeling.models import load_model_and_processor, save_model_folder
from ecg_r1.modeling.profiles import load_profile
from ecg_r1.training import readout


def _separable(rng: np.random.Generator, n: int, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, direction.size))
    return x, x @ direction + rng.normal(scale=0.3, size=n) > 0


def _head(truth: np.ndarray, other_margin: float) -> np.ndarray:
    """Output rows: Yes and No reading ``-truth`` (backwards), and a third token whose row is the
    ninth hidden dimension times ``other_margin`` (the token the other positions write)."""
    head = np.zeros((3, truth.size + 1))
    head[0, :-1], head[1, :-1] = -truth / 2, truth / 2
    head[2, -1] = other_margin
    return head


def _states(x: np.ndarray, others: int, rng: np.random.Generator) -> readout.CompletionStates:
    """Answer states ``x`` (with a ninth dimension 0) and other positions that point along the ninth."""
    answer = np.hstack([x, np.zeros((len(x), 1))])
    other = np.hstack([rng.normal(scale=0.1, size=(others, x.shape[1])), np.ones((others, 1))])
    return readout.CompletionStates(answer=answer, others=other)


class TestFit:
    def test_finds_the_direction_the_labels_follow_and_scores_the_old_one(self):
        rng = np.random.default_rng(0)
        truth = rng.normal(size=8)
        (xt, yt), (xs, ys) = _separable(rng, 400, truth), _separable(rng, 200, truth)
        train, select = (_states(xt, 50, rng), yt), (_states(xs, 50, rng), ys)
        fit = readout.fit_answer_readout(train, select, _head(truth, other_margin=100.0), (0, 1))
        w = fit.direction[:-1]
        assert w @ truth / np.linalg.norm(w) / np.linalg.norm(truth) > 0.95
        assert fit.applied and fit.changed_positions[fit.c] == 0
        assert fit.after_accuracy > 0.85 and fit.before_accuracy < 0.15  # the old rows read it backwards
        assert set(fit.selection_accuracy) == set(readout.READOUT_CS)

    def test_rows_that_would_change_another_positions_token_are_not_applied(self):
        rng = np.random.default_rng(1)
        truth = rng.normal(size=8)
        (xt, yt), (xs, ys) = _separable(rng, 400, truth), _separable(rng, 200, truth)
        select = _states(xs, 50, rng)
        # the third token wins the other positions by a hair: any answer direction there flips them
        head = _head(truth, other_margin=1e-6)
        fit = readout.fit_answer_readout((_states(xt, 50, rng), yt), (select, ys), head, (0, 1))
        assert not fit.applied and min(fit.changed_positions.values()) > 0
        np.testing.assert_allclose(fit.direction, head[0] - head[1])
        assert fit.after_accuracy == fit.before_accuracy
        assert readout.readout_metrics(fit)["readout_c"] == 0.0

    def test_ties_go_to_the_strongest_regularisation(self):
        rng = np.random.default_rng(2)
        truth = np.ones(3)
        x, y = _separable(rng, 200, truth)
        select = (_states(np.eye(3), 3, rng), np.ones(3, bool))  # every C reads these three the same way
        fit = readout.fit_answer_readout(
            (_states(x, 20, rng), y), select, _head(truth, 100.0), (0, 1), cs=(1.0, 0.1, 10.0)
        )
        assert fit.c == 0.1

    def test_one_class_or_no_strength_is_refused(self):
        rng = np.random.default_rng(3)
        states = _states(np.zeros((4, 2)), 2, rng)
        head = _head(np.ones(2), 1.0)
        with pytest.raises(ValueError, match="ischemic and non-ischemic"):
            readout.fit_answer_readout((states, np.ones(4, bool)), (states, np.ones(4, bool)), head, (0, 1))
        with pytest.raises(ValueError, match="no regularisation"):
            readout.fit_answer_readout(
                (states, np.arange(4) % 2 == 0), (states, np.ones(4, bool)), head, (0, 1), cs=()
            )


class TestOutputRows:
    @pytest.mark.parametrize("fixture", ["single_token_model", "tied_single_token_model"])
    def test_only_the_two_answer_rows_change_and_their_difference_is_the_direction(
        self, request, fixture, tmp_path
    ):
        model, processor = load_model_and_processor(*request.getfixturevalue(fixture))
        tied = (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        )
        assert tied == (fixture == "tied_single_token_model")
        ids = readout.answer_token_pair(processor.tokenizer)
        head_before = model.get_output_embeddings().weight.detach().clone()
        embeddings_before = model.get_input_embeddings().weight.detach().clone()
        direction = np.random.default_rng(2).normal(size=head_before.shape[1])
        readout.set_answer_direction(model, ids, direction)
        head = model.get_output_embeddings().weight.detach()
        np.testing.assert_allclose(readout.answer_direction(model, ids), direction, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head[list(ids)].sum(0), head_before[list(ids)].sum(0))
        others = [i for i in range(head.shape[0]) if i not in ids]
        torch.testing.assert_close(head[others], head_before[others], rtol=0, atol=0)
        # the prompt's words keep their embeddings: a tied layer is untied first
        torch.testing.assert_close(
            model.get_input_embeddings().weight.detach(), embeddings_before, rtol=0, atol=0
        )
        save_model_folder(model, processor, tmp_path / "refit")
        reloaded, _ = load_model_and_processor(tmp_path / "refit", request.getfixturevalue(fixture)[1])
        np.testing.assert_allclose(readout.answer_direction(reloaded, ids), direction, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reloaded.get_input_embeddings().weight.detach(), embeddings_before)

    def test_a_tokenizer_spelling_an_answer_in_several_tokens_is_refused(
        self, small_model_dir, small_profile_path
    ):
        _, processor = load_model_and_processor(small_model_dir, load_profile(small_profile_path))
        with pytest.raises(ValueError, match="one token each"):
            readout.answer_token_pair(processor.tokenizer)


class TestCompletionStates:
    def test_the_states_of_an_unpadded_pass_and_the_answer_rows_read_the_models_own_p_yes(
        self, single_token_model, examples
    ):
        from ecg_r1.modeling.prompts import format_target

        model, processor = load_model_and_processor(*single_token_model)
        answers = [True, False, True]
        states = readout.completion_states(model, processor, examples, answers, batch_size=2)
        hidden = model.config.text_config.hidden_size
        assert states.answer.shape == (len(examples), hidden)
        # each example's completion positions, from a pass over it alone (no padding)
        tokenizer = processor.tokenizer
        prompts = inference.prompt_texts(processor, examples)
        expected_answer, expected_others = [], []
        for example, prompt, answer in zip(examples, prompts, answers, strict=True):
            text = prompt + format_target(answer) + tokenizer.eos_token
            inputs = processor(text=[text], images=[example["image"]], return_tensors="pt")
            with torch.no_grad():
                h = model(**inputs, output_hidden_states=True).hidden_states[-1][0].numpy()

            def length(t: str) -> int:
                return len(tokenizer(t, add_special_tokens=False)["input_ids"])

            # the processor spreads the page over many tokens, so count from the end
            completion = length(text) - length(prompt)
            at_answer = length(prompt + inference.forced_answer_prefix("")) - length(prompt)
            first = h.shape[0] - 1 - completion  # the last prompt token predicts the first completion token
            expected_answer.append(h[first + at_answer])
            expected_others.extend(h[p] for p in range(first, h.shape[0] - 1) if p != first + at_answer)
        np.testing.assert_allclose(states.answer, np.array(expected_answer), atol=1e-4)
        np.testing.assert_allclose(states.others, np.array(expected_others), atol=1e-4)
        ids = readout.answer_token_pair(tokenizer)
        from_states = 1 / (1 + np.exp(-states.answer @ readout.answer_direction(model, ids)))
        # P(Yes) of an answer-only completion, teacher-forced the way the evaluation reads it
        p_yes = inference.answer_probability(model, processor, examples, completions=[""] * len(examples))
        np.testing.assert_allclose(from_states, p_yes, atol=1e-5)

    def test_one_answer_per_example(self, single_token_model, examples):
        model, processor = load_model_and_processor(*single_token_model)
        with pytest.raises(ValueError, match="one per example"):
            readout.completion_states(model, processor, examples, [True])
