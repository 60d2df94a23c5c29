"""The answer read-out re-fit: after SFT, the output rows of "Yes" and "No" set by a logistic
regression on the last hidden state where the answer word is written.

Why: a fine-tuned language model can carry more of the label at the decision point than its
output layer reads. On the smol long run's SFT model (docs/smol.md, "The answer read-out re-fit")
a logistic regression on that state, fitted on the training cases with C chosen on val, ranks the
internal test split at AUROC 0.82 where the model's own answer gives 0.72; its SFT loss had
plateaued within 1.6-3.1 epochs. It is last-layer retraining (DFR, Kirichenko et al. 2022; the "LP"
of LP-FT) by a convex fit instead of more steps, switched by ``stages.sft.refit_answer_readout``.

How: the answer is the argmax over the vocabulary at that position, and P(Yes) the two answer
words' softmax, so the difference of their two output rows decides. The fit (no intercept: the
rows have no bias) gives a direction ``w``; the rows become ``m + w/2`` and ``m - w/2`` around their
old mean ``m``, so ``logit(Yes) - logit(No) = w . h`` there. The same rows score every other
position, though: fitted on the answer position alone, the smol model's new rows made "No" beat
the end of the turn after ``</answer>`` in every completion (measured: valid rate 0). So the
completion's other positions join the fit with ``w . h`` pulled towards 0, and a ``C`` counts only
if the new rows leave the greedy token of every other validation completion position as it was.
A model whose output layer shares its weights with the input embeddings (SmolLM2) gets its own
output layer first, so the prompt's words keep their embeddings. The model still writes
``<think></think><answer>Yes</answer>``; only which answer word it writes changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecg_r1.modeling.inference import answer_token_ids, encoded_batches, forced_answer_prefix, prompt_texts
from ecg_r1.modeling.prompts import format_target
from ecg_r1.training.data import case_examples

# Inverse L2 strengths tried on the 576 (smol) or 192 (tiny) hidden dimensions; val chose 1 for the
# smol long run's SFT model, 0.03 to 10 for three tiny SFT seeds.
READOUT_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
PAGES_AT_A_TIME = 256


@dataclass(frozen=True)
class ReadoutFit:
    """A fitted answer read-out.

    Attributes:
        direction: ``w``, the hidden-state weights of ``logit(Yes) - logit(No)``; the current
            rows' difference when no ``C`` was eligible.
        c: the inverse regularisation strength chosen on the selection cases, or None when none
            kept the selection completions' greedy tokens (the rows then stay as they are).
        selection_accuracy: every tried ``C`` -> accuracy on the selection cases.
        before_accuracy: the output layer's own accuracy on the selection cases, before the re-fit.
        changed_positions: every tried ``C`` -> selection completion positions whose greedy
            token the new rows would change (0 makes it eligible).
    """

    direction: np.ndarray
    c: float | None
    selection_accuracy: dict[float, float]
    before_accuracy: float
    changed_positions: dict[float, int]

    @property
    def applied(self) -> bool:
        return self.c is not None

    @property
    def after_accuracy(self) -> float:
        return self.selection_accuracy[self.c] if self.c is not None else self.before_accuracy


def answer_token_pair(tokenizer: Any) -> tuple[int, int]:
    """The ids of the single tokens ``Yes`` and ``No`` after ``<answer>``.

    Raises:
        ValueError: when either word is not one token there (the re-fit sets one row per word).
    """
    ids = answer_token_ids(tokenizer, forced_answer_prefix(""))
    if ids is None:
        raise ValueError("the tokenizer does not spell Yes and No as one token each after <answer>")
    return ids


@dataclass(frozen=True)
class CompletionStates:
    """Last hidden states (after the final norm) along teacher-forced answer-only completions.

    Attributes:
        answer: ``(cases, hidden)``, where the answer word is written.
        others: ``(positions, hidden)``, every other position that writes a completion token (the
            think and answer tags, and the end of the turn), all cases together: where the answer
            words must stay unwritten.
    """

    answer: np.ndarray
    others: np.ndarray


def completion_states(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    answers: Sequence[bool],
    batch_size: int = 8,
) -> CompletionStates:
    """The hidden states along ``<think></think><answer>X</answer>`` and the end of the turn, X
    each example's answer, teacher-forced after its prompt (notes as inference shows them).

    The answer position's state does not depend on X (it comes before it); the positions after it do.
    """
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples; pass one per example")
    tokenizer = processor.tokenizer
    prompts = prompt_texts(processor, examples)
    texts = [
        prompt + format_target(bool(a)) + tokenizer.eos_token
        for prompt, a in zip(prompts, answers, strict=True)
    ]
    to_answer = forced_answer_prefix("")  # "<think></think><answer>"

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    answer_states, other_states = [], []
    for part, inputs in encoded_batches(model, processor, texts, examples, batch_size):
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        end = hidden.shape[1] - 1  # left padding: every row ends at the same place
        for row, index in enumerate(range(len(examples))[part]):
            prompt_length = length(prompts[index])
            # position t predicts token t + 1: the completion's tokens are predicted from the
            # last prompt token up to the one before the end of the turn's
            states = hidden[row, end - (length(texts[index]) - prompt_length) : end].float().cpu().numpy()
            at_answer = length(prompts[index] + to_answer) - prompt_length
            answer_states.append(states[at_answer])
            other_states.extend(np.delete(states, at_answer, axis=0))
    return CompletionStates(
        answer=np.asarray(answer_states, np.float64), others=np.asarray(other_states, np.float64)
    )


def _answer_logits(
    states: np.ndarray, head: np.ndarray, ids: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per state: the mean of the Yes and No logits, and the best logit of every other token."""
    logits = states.astype(np.float32) @ head.T
    mean = logits[:, list(ids)].mean(axis=1)
    logits[:, list(ids)] = -np.inf
    return mean.astype(np.float64), logits.max(axis=1).astype(np.float64)


def fit_answer_readout(
    train: tuple[CompletionStates, np.ndarray],
    select: tuple[CompletionStates, np.ndarray],
    head: np.ndarray,
    ids: tuple[int, int],
    cs: Sequence[float] = READOUT_CS,
) -> ReadoutFit:
    """Fit ``logit(Yes) - logit(No) = w . h`` at the answer position, ``C`` chosen on ``select``.

    The training completions' other positions join the fit as cases labelled Yes and No at half
    weight each: their loss is least at ``w . h = 0``, so the fit keeps the two words' logits near
    their mean wherever another token is written. A ``C`` is eligible only when, on the selection
    completions, the new rows leave every other position's greedy token as it was and still make
    the answer position write Yes or No; the best eligible one on accuracy wins. With none
    eligible the output layer stays as it is (``applied`` False).

    Args:
        train, select: ``(completion states, is_ischemic)``.
        head: the output layer's weights ``(vocabulary, hidden)``, float32 (no copy is made).
        ids: the token ids of Yes and No.
        cs: inverse regularisation strengths; ties go to the stronger regularisation.

    Raises:
        ValueError: when the training cases lack one of the classes, or ``cs`` is empty.
    """
    from sklearn.linear_model import LogisticRegression

    states, y_train = train[0], np.asarray(train[1], bool)
    chosen, y_select = select[0], np.asarray(select[1], bool)
    if len(set(y_train.tolist())) < 2:
        raise ValueError("the answer read-out needs ischemic and non-ischemic training cases")
    if not cs:
        raise ValueError("no regularisation strength to try")
    anchors = len(states.others)
    x = np.vstack([states.answer, states.others, states.others])
    y = np.concatenate([y_train, np.ones(anchors, bool), np.zeros(anchors, bool)])
    weight = np.concatenate([np.ones(len(y_train)), np.full(2 * anchors, 0.5)])
    head = np.asarray(head, np.float32)  # the vocabulary's logits in the model's own precision
    current = head[ids[0]].astype(np.float64) - head[ids[1]]
    answer_mean, answer_best_other = _answer_logits(chosen.answer, head, ids)
    others_mean, others_best = _answer_logits(chosen.others, head, ids)
    directions, scores, changed = {}, {}, {}
    for c in sorted(cs):
        model = LogisticRegression(C=c, fit_intercept=False, max_iter=5000)
        directions[c] = model.fit(x, y, sample_weight=weight).coef_[0].copy()
        scores[c] = float(((chosen.answer @ directions[c] > 0) == y_select).mean())
        # the rows keep their mean, so the larger answer word's logit is mean + |w . h| / 2
        answer_top = answer_mean + np.abs(chosen.answer @ directions[c]) / 2
        others_top = others_mean + np.abs(chosen.others @ directions[c]) / 2
        changed[c] = int((answer_top <= answer_best_other).sum() + (others_top >= others_best).sum())
    before = float(((chosen.answer @ current > 0) == y_select).mean())
    eligible = [c for c in sorted(cs) if changed[c] == 0]
    if not eligible:
        return ReadoutFit(current, None, scores, before, changed)
    best = max(eligible, key=lambda c: scores[c])  # max keeps the first (smallest C) among ties
    return ReadoutFit(directions[best], best, scores, before, changed)


def untie_output_layer(model: Any) -> bool:
    """Give the output layer its own weights where it shares them with the input embeddings.

    Returns:
        True when it was tied (the config now says untied, so the saved folder loads untied).
    """
    import torch

    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.data_ptr() != embeddings.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return True


def answer_direction(model: Any, ids: tuple[int, int]) -> np.ndarray:
    """The output layer's ``W[Yes] - W[No]`` (``ids``: Yes, No)."""
    weight = model.get_output_embeddings().weight.detach()
    return (weight[ids[0]] - weight[ids[1]]).float().cpu().numpy().astype(np.float64)


def set_answer_direction(model: Any, ids: tuple[int, int], direction: np.ndarray) -> None:
    """Set the Yes and No output rows to ``m + w/2`` and ``m - w/2`` around their mean ``m``."""
    import torch

    untie_output_layer(model)
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        mean = (weight[ids[0]] + weight[ids[1]]) / 2
        half = torch.as_tensor(direction, dtype=weight.dtype, device=weight.device) / 2
        weight[ids[0]] = mean + half
        weight[ids[1]] = mean - half


def refit_answer_readout(
    model: Any, processor: Any, train_cases: Any, select_cases: Any, batch_size: int = 8
) -> ReadoutFit:
    """Re-fit the model's Yes/No output rows on ``train_cases``, ``C`` chosen on ``select_cases``.

    Both are case tables (:func:`ecg_r1.training.data.load_cases`: image paths, age, sex, note and
    a boolean label), shown as inference shows them: notes as written, unseen words marked the way
    the processor's profile says. The model is changed in place when a ``C`` is eligible.
    """
    ids = answer_token_pair(processor.tokenizer)

    def states(cases: Any) -> tuple[CompletionStates, np.ndarray]:
        # a few hundred pages open at a time, so a cohort of any size never sits in memory
        parts = [
            completion_states(model, processor, case_examples(chunk), chunk["label"].to_numpy(), batch_size)
            for chunk in cases.iter_slices(PAGES_AT_A_TIME)
        ]
        joined = CompletionStates(
            answer=np.concatenate([part.answer for part in parts]),
            others=np.concatenate([part.others for part in parts]),
        )
        return joined, cases["label"].to_numpy()

    head = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    fit = fit_answer_readout(states(train_cases), states(select_cases), head, ids)
    if fit.applied:
        set_answer_direction(model, ids, fit.direction)
    return fit


def readout_metrics(fit: ReadoutFit) -> dict[str, float]:
    """What the run logs of a re-fit: the chosen C (0 when none was eligible and the rows stayed),
    the validation accuracy before and after, and the completion positions the chosen rows change."""
    return {
        "readout_c": fit.c or 0.0,
        "readout_val_accuracy_before": fit.before_accuracy,
        "readout_val_accuracy_after": fit.after_accuracy,
        "readout_val_changed_positions": float(fit.changed_positions[fit.c]) if fit.applied else 0.0,
    }
