"""Generating answers and reading the model's probability of "Yes".

An *example* is a mapping with ``image`` (a PIL image of the rendered page) and ``age``, ``sex``,
``note`` (any may be None); the prompt is :func:`ecg_r1.modeling.prompts.build_multimodal_prompt`, the
same words the trainers use.

:func:`answer_probability` gives a score for ROC analysis that does not depend on sampling: the
model's completion is teacher-forced up to the answer, then the probabilities the model gives to
the answer words are compared.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ecg_r1.constants import PREDICTION_BATCH_SIZE
from ecg_r1.modeling.contract import ANSWER_OPEN, NO, THINK_CLOSE, THINK_OPEN, YES
from ecg_r1.modeling.models import vision_token_ids
from ecg_r1.modeling.notes import mark_unseen_words
from ecg_r1.modeling.processor import NOTE_VOCABULARY_FILE
from ecg_r1.modeling.prompts import build_multimodal_prompt

logger = logging.getLogger(__name__)


def _check_examples(examples: Sequence[Mapping[str, Any]]) -> None:
    for i, example in enumerate(examples):
        image = example.get("image") if isinstance(example, Mapping) else None
        if image is None or not hasattr(image, "convert"):
            raise ValueError(
                f"example {i} needs an 'image' (a PIL image of the rendered ECG page), got "
                f"{type(image).__name__}; render the record with ecg_r1.imaging.draw.render_page first"
            )


def prompt_texts(processor: Any, examples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The chat-formatted prompt of each example, ending with the assistant's turn.

    The page sits where the profile the processor was loaded with puts it
    (``processor.image_position``, set by :func:`ecg_r1.modeling.processor.load_processor`); with
    ``unseen_note_words: mark`` each note word outside the model's training vocabulary
    (``processor.note_vocabulary``, which SFT and GRPO leave in the folder) is shown as ``?``, and
    every word of a note with most of its words outside it (:func:`mark_unseen_words`); a
    folder without one (a base or vision-only model) gets its notes as written, with a warning.
    """
    position = getattr(processor, "image_position", "first")
    notes = [ex.get("note") for ex in examples]
    if getattr(processor, "unseen_note_words", "keep") == "mark":
        vocabulary = getattr(processor, "note_vocabulary", None)
        if vocabulary is None:
            # A base, vision-only or hub model never learned from notes: nothing to mark against.
            logger.warning(
                "model.unseen_note_words is mark but the model folder has no %s (no SFT or GRPO stage "
                "wrote it): notes are shown as written",
                NOTE_VOCABULARY_FILE,
            )
        else:
            notes = [mark_unseen_words(note, vocabulary) for note in notes]
    return [
        processor.apply_chat_template(
            build_multimodal_prompt(ex.get("age"), ex.get("sex"), note, position),
            add_generation_prompt=True,
            tokenize=False,
        )
        for ex, note in zip(examples, notes, strict=True)
    ]


@contextlib.contextmanager
def _padding_side(processor: Any, side: str) -> Iterator[None]:
    # Decoder-only generation needs left padding so every prompt ends where generation starts.
    tokenizer = processor.tokenizer
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _encode(processor: Any, texts: list[str], images: list[Any], device: Any) -> dict[str, Any]:
    encoded = processor(
        text=texts, images=[image.convert("RGB") for image in images], return_tensors="pt", padding=True
    )
    return {key: value.to(device) for key, value in encoded.items()}


def encoded_batches(
    model: Any, processor: Any, texts: list[str], examples: Sequence[Mapping[str, Any]], batch_size: int
) -> Iterator[tuple[slice, dict[str, Any]]]:
    """``(rows, model inputs)`` for each batch of ``texts`` with their examples' pages, left-padded
    (every row ends where the model reads or writes next), with the model in eval mode and
    gradients off for as long as the batches are consumed; the model's mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with _padding_side(processor, "left"), torch.inference_mode():
            for part in _batches(len(texts), batch_size):
                yield (
                    part,
                    _encode(processor, texts[part], [ex["image"] for ex in examples[part]], model.device),
                )
    finally:
        model.train(was_training)


def generate(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = PREDICTION_BATCH_SIZE,
    seed: int | None = None,
) -> list[str]:
    """Generate a completion for each example.

    Args:
        model: a Qwen2-VL model (see :func:`ecg_r1.modeling.models.load_model_and_processor`).
        processor: its :class:`ecg_r1.modeling.processor.ECGProcessor`.
        examples: mappings with ``image``, ``age``, ``sex``, ``note``.
        max_new_tokens: completion length cap (a completion cut here is invalid by contract).
        temperature: 0 for greedy decoding (deterministic); above 0 samples.
        batch_size: examples per ``generate`` call.
        seed: seeds sampling when temperature > 0.

    Returns:
        The completions, special tokens removed, in the order of ``examples``.

    Raises:
        ValueError: when an example has no image, or an argument is out of range.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return _generate(model, processor, examples, max_new_tokens, temperature, batch_size, seed)[0]


def generate_and_score(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 128,
    batch_size: int = PREDICTION_BATCH_SIZE,
) -> tuple[list[str], np.ndarray]:
    """Greedy completions (:func:`generate`) and P(Yes) (:func:`answer_probability`) of each example.

    Where the greedy completion's tokens up to its answer are the tokens of
    :func:`forced_answer_prefix` (as the tokenizer writes it after the prompt) and each answer word
    is one token (:func:`answer_token_ids`), P(Yes) is read from the logits generation computed
    at that position: the teacher-forced numbers without another pass. The other examples (a
    broken format, several-token answer words) are teacher-forced.

    Returns:
        ``(completions, p_yes)``, in the order of ``examples``.

    Raises:
        ValueError: when an example has no image, or ``batch_size`` is below 1.
    """
    completions, read = _generate(
        model, processor, examples, max_new_tokens, 0.0, batch_size, None, read_answers=True
    )
    p_yes = np.array([np.nan if value is None else value for value in read], dtype=np.float64)
    rest = [i for i, value in enumerate(read) if value is None]
    if rest:
        p_yes[rest] = answer_probability(
            model,
            processor,
            [examples[i] for i in rest],
            [completions[i] for i in rest],
            batch_size=batch_size,
        )
    return completions, p_yes


def _generate(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int | None,
    read_answers: bool = False,
) -> tuple[list[str], list[float | None]]:
    """Completions, and with ``read_answers`` (greedy) P(Yes) where the generation's own logits give it."""
    import torch

    _check_examples(examples)
    if seed is not None:
        torch.manual_seed(seed)
    texts = prompt_texts(processor, examples)
    tokenizer = processor.tokenizer
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    outputs: list[str] = []
    read: list[float | None] = []
    for part, inputs in encoded_batches(model, processor, texts, examples, batch_size):
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            # A checkpoint's generation_config may carry sampling defaults (top_k, top_p);
            # greedy decoding must not inherit them.
            top_k=None,
            top_p=None,
            suppress_tokens=vision_token_ids(model.config),
            # The raw logits of every step (before the suppression above), to read P(Yes).
            return_dict_in_generate=read_answers,
            output_logits=read_answers,
            **sampling,
        )
        sequences = generated.sequences if read_answers else generated
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        outputs.extend(completions)
        if read_answers:
            for row, (prompt, completion) in enumerate(zip(texts[part], completions, strict=True)):
                read.append(
                    _answer_probability_from_generation(
                        tokenizer, prompt, completion, new_tokens[row].tolist(), generated.logits, row
                    )
                )
    return outputs, read


def _answer_probability_from_generation(
    tokenizer: Any, prompt: str, completion: str, new_tokens: list[int], logits: Sequence[Any], row: int
) -> float | None:
    """P(Yes) from the logits of the generation step at the answer position, when the generated
    tokens before it are exactly what teacher-forcing would feed (else None)."""
    import torch

    prefix = prompt + forced_answer_prefix(completion)
    answer_ids = answer_token_ids(tokenizer, prefix)
    if answer_ids is None:
        return None
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    forced = prefix_ids[len(prompt_ids) :]
    if prefix_ids[: len(prompt_ids)] != prompt_ids or len(forced) >= len(logits):
        return None
    if new_tokens[: len(forced)] != forced:
        return None
    logprobs = torch.log_softmax(logits[len(forced)][row].float(), dim=-1)
    lp_yes, lp_no = float(logprobs[answer_ids[0]]), float(logprobs[answer_ids[1]])
    return _yes_probability(lp_yes, lp_no)


def forced_answer_prefix(completion: str) -> str:
    """The completion up to and including ``<answer>``, used to teacher-force the answer position.

    The generated reasoning is kept as written: the text between ``<think>`` and the first
    ``</think>``. A completion without ``</think>`` (truncated, or answer-only) keeps what it has
    before any ``<answer>`` as its reasoning. The result is always
    ``<think>REASONING</think><answer>``.

    Args:
        completion: a generated completion.

    Returns:
        The prefix to append to the prompt.
    """
    text = completion
    start = text.find(THINK_OPEN)
    if start >= 0:
        text = text[start + len(THINK_OPEN) :]
    end = text.find(THINK_CLOSE)
    if end >= 0:
        think = text[:end]
    else:
        answer_at = text.find(ANSWER_OPEN)
        think = text if answer_at < 0 else text[:answer_at]
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}"


def answer_probability(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    completions: Sequence[str] | None = None,
    batch_size: int = PREDICTION_BATCH_SIZE,
    max_new_tokens: int = 128,
) -> np.ndarray:
    """The model's probability that the answer is "Yes" (ischemic), per example.

    How: the prompt plus :func:`forced_answer_prefix` of the completion
    (``<think>REASONING</think><answer>``) is teacher-forced, and the log-probability of the
    tokens spelling ``Yes`` and of those spelling ``No`` at that position is read (each word is
    one token in Qwen's tokenizer and usually in the tiny one; when a word spans several tokens
    their log-probabilities are summed). P(Yes) = exp(lp_yes) / (exp(lp_yes) + exp(lp_no)): the
    next-token distribution restricted to the two answers. Invalid completions still get a
    probability (their reasoning is forced into the contract's shape), so AUROC covers every
    case; the evaluation reports the invalid rate separately.

    Where each answer word is one token after the prefix (:func:`answer_token_ids`), one pass over
    the prefix reads both from its last position: the same numbers as teacher-forcing the two
    continuations, for half the forward passes. Other examples score the two continuations.

    Args:
        model, processor: as for :func:`generate`.
        examples: mappings with ``image``, ``age``, ``sex``, ``note``.
        completions: the model's completions for these examples; None generates them greedily.
        batch_size: examples per forward pass (each example is scored as two sequences).
        max_new_tokens: for the greedy generation when ``completions`` is None.

    Returns:
        float64 array of P(Yes), shape ``(len(examples),)``.

    Raises:
        ValueError: when ``completions`` does not match ``examples`` in length, or an example
            has no image.
    """
    import torch

    _check_examples(examples)
    if completions is None:
        return generate_and_score(
            model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size
        )[1]
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions for {len(examples)} examples; pass one per example")
    prefixes = [
        prompt + forced_answer_prefix(completion)
        for prompt, completion in zip(prompt_texts(processor, examples), completions, strict=True)
    ]
    token_ids = [answer_token_ids(processor.tokenizer, prefix) for prefix in prefixes]
    one_pass = [i for i, ids in enumerate(token_ids) if ids is not None]
    two_pass = [i for i, ids in enumerate(token_ids) if ids is None]
    probabilities = np.empty(len(examples), dtype=np.float64)
    one_pass_texts = [prefixes[i] for i in one_pass]
    for part, inputs in encoded_batches(
        model, processor, one_pass_texts, [examples[i] for i in one_pass], batch_size
    ):
        # Left padding: every row's last position predicts the answer word.
        logprobs = torch.log_softmax(model(**inputs, logits_to_keep=1).logits[:, -1].float(), dim=-1)
        for row, index in enumerate(one_pass[part]):
            yes_id, no_id = token_ids[index]
            probabilities[index] = _yes_probability(float(logprobs[row, yes_id]), float(logprobs[row, no_id]))
    # Each remaining example as a (Yes, No) pair of rows; batches of 2 x batch_size keep pairs together.
    pair_texts = [text for i in two_pass for text in (prefixes[i] + YES, prefixes[i] + NO)]
    pair_examples = [examples[i] for i in two_pass for _ in range(2)]
    for part, inputs in encoded_batches(model, processor, pair_texts, pair_examples, 2 * batch_size):
        scores = _continuation_logprobs(model, inputs)
        for offset, index in enumerate(two_pass[part.start // 2 : part.stop // 2]):
            probabilities[index] = _yes_probability(scores[2 * offset], scores[2 * offset + 1])
    return probabilities


def _yes_probability(lp_yes: float, lp_no: float) -> float:
    """P(Yes) of the two answers alone, from their log-probabilities at the answer position."""
    return 1.0 / (1.0 + math.exp(lp_no - lp_yes))


def answer_token_ids(tokenizer: Any, prefix: str) -> tuple[int, int] | None:
    """The token ids of ``Yes`` and ``No`` when each is exactly one token appended to the tokens
    of ``prefix`` (the prompt and :func:`forced_answer_prefix`), else None (a word split into
    several tokens, or merged with the prefix's last token)."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for word in (YES, NO):
        tokens = tokenizer(prefix + word, add_special_tokens=False)["input_ids"]
        if len(tokens) != len(base) + 1 or tokens[: len(base)] != base:
            return None
        ids.append(tokens[-1])
    return ids[0], ids[1]


def _continuation_logprobs(model: Any, inputs: dict[str, Any]) -> list[float]:
    """Sum of log-probabilities of each pair's differing tail (the answer word's tokens).

    Rows come in pairs (Yes, No) sharing the same prefix; with left padding every row ends at the
    last position, so only the last few positions' logits are needed (``logits_to_keep``), which
    keeps memory small with a 150k-token vocabulary.
    """
    import torch

    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool()
    tails = []
    for row in range(0, ids.shape[0], 2):
        yes, no = ids[row][mask[row]], ids[row + 1][mask[row + 1]]
        common = 0
        limit = min(len(yes), len(no))
        while common < limit and yes[common] == no[common]:
            common += 1
        tails.extend((len(yes) - common, len(no) - common))
    if min(tails) < 1:
        raise RuntimeError(
            "the Yes and No continuations tokenised identically; the tokenizer cannot tell them apart"
        )
    keep = max(tails) + 1
    logits = model(**inputs, logits_to_keep=keep).logits  # (rows, keep, vocab)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for row, tail in enumerate(tails):
        # The last `tail` tokens are predicted by the positions just before them.
        targets = ids[row, -tail:]
        positions = torch.arange(keep - 1 - tail, keep - 1, device=logprobs.device)
        out.append(float(logprobs[row, positions, targets].sum()))
    return out


def predict(
    model: Any, processor: Any, examples: Sequence[Mapping[str, Any]], max_new_tokens: int = 128
) -> list[dict[str, Any]]:
    """The model's answer to each example, as ``ecg-r1 predict`` prints it and the served model
    returns it: a greedy completion, its reading against the output contract, and P(Yes).

    Args:
        model, processor: as for :func:`generate`.
        examples: mappings with ``image``, ``age``, ``sex``, ``note``.
        max_new_tokens: completion length cap.

    Returns:
        One mapping per example: ``completion`` (the raw text), ``valid`` (it follows the
        contract), ``reasoning`` (the think block; None when not valid), ``answer`` (``"Yes"``,
        ``"No"``, or None when not valid), ``problem`` (what broke the contract; None when
        valid) and ``p_yes`` (:func:`generate_and_score`, rounded to 4 places).

    Raises:
        ValueError: when an example has no image.
    """
    from ecg_r1.modeling.contract import parse_completion

    completions, probabilities = generate_and_score(model, processor, examples, max_new_tokens=max_new_tokens)
    results = []
    for completion, p_yes in zip(completions, probabilities, strict=True):
        parsed = parse_completion(completion)
        results.append(
            {
                "completion": completion,
                "valid": parsed.valid,
                "reasoning": parsed.think,
                "answer": None if parsed.answer is None else (YES if parsed.answer else NO),
                "problem": parsed.problem,
                "p_yes": round(float(p_yes), 4),
            }
        )
    return results
