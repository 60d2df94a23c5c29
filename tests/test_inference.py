"""Generation, P(Yes) at the answer position, and ``ecg-r1 predict`` on a written WFDB record.

Uses a smaller variant of the tiny profile (same architecture, smaller sizes) to stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ecg_r1.modeling import inference
from ecg_r1.modeling.contract import YES
from ecg_r1.modeling.models import load_model_and_processor
from ecg_r1.modeling.profiles import load_profile


@pytest.fixture
def loaded(small_model_dir, small_profile_path):
    return load_model_and_processor(small_model_dir, load_profile(small_profile_path))


@pytest.fixture
def single_token_loaded(single_token_model):
    return load_model_and_processor(*single_token_model)


class TestGenerate:
    def test_one_string_per_example_and_batching_does_not_change_greedy_output(self, loaded, examples):
        model, processor = loaded
        batched = inference.generate(model, processor, examples, max_new_tokens=8, batch_size=3)
        single = [inference.generate(model, processor, [ex], max_new_tokens=8)[0] for ex in examples]
        assert len(batched) == 3 and all(isinstance(text, str) for text in batched)
        assert batched == single
        assert processor.tokenizer.padding_side == "right"  # restored after generation

    def test_sampling_is_reproducible_with_a_seed(self, loaded, examples):
        model, processor = loaded
        first = inference.generate(model, processor, examples[:2], max_new_tokens=8, temperature=1.0, seed=3)
        again = inference.generate(model, processor, examples[:2], max_new_tokens=8, temperature=1.0, seed=3)
        assert first == again

    def test_example_without_image_is_refused(self, loaded):
        model, processor = loaded
        with pytest.raises(ValueError, match="needs an 'image'"):
            inference.generate(model, processor, [{"age": 1, "sex": "M", "note": ""}])


class TestForcedAnswerPrefix:
    @pytest.mark.parametrize(
        "completion,prefix",
        [
            ("<think>TWI V1</think><answer>No</answer>", "<think>TWI V1</think><answer>"),
            ("<think>cut off", "<think>cut off</think><answer>"),
            ("<answer>Yes</answer>", "<think></think><answer>"),
            ("free text", "<think>free text</think><answer>"),
        ],
    )
    def test_keeps_the_reasoning_and_ends_at_the_answer(self, completion, prefix):
        assert inference.forced_answer_prefix(completion) == prefix


def teach(model, inputs, n_last: int, steps: int) -> None:
    """Train on the last ``n_last`` tokens of every row (Adam, lr 1e-2): a small model learns
    them in a few steps."""
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -n_last:] = inputs["input_ids"][:, -n_last:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()


class TestAnswerProbability:
    @pytest.mark.parametrize("tokens_per_word", ["several", "one"])
    def test_equals_the_answer_words_probability_from_an_unpadded_pass(
        self, request, tokens_per_word, examples
    ):
        model, processor = request.getfixturevalue(
            "loaded" if tokens_per_word == "several" else "single_token_loaded"
        )
        completions = ["<think>TWI in V2</think><answer>Yes</answer>", "garbled", "<think>a"]
        probabilities = inference.answer_probability(model, processor, examples, completions, batch_size=2)
        assert probabilities.shape == (3,) and ((probabilities > 0) & (probabilities < 1)).all()
        for example, completion, probability in zip(examples, completions, probabilities, strict=True):
            prefix = inference.prompt_texts(processor, [example])[0] + inference.forced_answer_prefix(
                completion
            )
            scores = []
            for word in ("Yes", "No"):
                inputs = processor(
                    text=[prefix + word], images=[example["image"].convert("RGB")], return_tensors="pt"
                )
                n_word = len(processor.tokenizer(word, add_special_tokens=False)["input_ids"])
                with torch.no_grad():
                    logprobs = model(**inputs).logits[0].log_softmax(-1)
                ids = inputs["input_ids"][0]
                positions = range(len(ids) - n_word, len(ids))
                scores.append(sum(logprobs[t - 1, ids[t]].item() for t in positions))
            expected = 1 / (1 + np.exp(scores[1] - scores[0]))
            assert probability == pytest.approx(expected, abs=1e-5)

    @pytest.mark.parametrize("fixture,passes", [("single_token_loaded", 1), ("loaded", 2)])
    def test_one_pass_at_the_answer_position_where_each_word_is_one_token(
        self, request, fixture, passes, examples, monkeypatch
    ):
        model, processor = request.getfixturevalue(fixture)
        completions = ["<think>TWI in V2</think><answer>Yes</answer>", "garbled", "<think>a"]
        prefix = inference.prompt_texts(processor, examples[:1])[0] + inference.forced_answer_prefix(
            completions[0]
        )
        assert (inference.answer_token_ids(processor.tokenizer, prefix) is not None) == (passes == 1)
        rows = []
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        try:
            scored = inference.answer_probability(model, processor, examples, completions, batch_size=8)
        finally:
            hook.remove()
        assert rows == [passes * len(examples)]  # one forward pass, one or two rows an example
        # Where each word is one token, reading both at the prefix's end equals scoring both words.
        monkeypatch.setattr(inference, "answer_token_ids", lambda tokenizer, prefix: None)
        both = inference.answer_probability(model, processor, examples, completions, batch_size=8)
        np.testing.assert_allclose(scored, both, atol=1e-5)

    @pytest.mark.parametrize("fixture", ["single_token_loaded", "loaded"])
    def test_generate_and_score_equals_generating_then_teacher_forcing(self, request, fixture, examples):
        model, processor = request.getfixturevalue(fixture)
        completions, p_yes = inference.generate_and_score(
            model, processor, examples, max_new_tokens=8, batch_size=2
        )
        assert completions == inference.generate(model, processor, examples, max_new_tokens=8, batch_size=2)
        forced = inference.answer_probability(model, processor, examples, completions, batch_size=2)
        np.testing.assert_allclose(p_yes, forced, atol=1e-5)

    @pytest.mark.slow  # trains a tiny model to answer in the contract first: about 3 s
    def test_a_completion_in_the_contract_is_scored_from_its_own_generation(
        self, single_token_loaded, examples, monkeypatch
    ):
        model, processor = single_token_loaded
        target = "<think></think><answer>Yes</answer>"
        texts = [prompt + target for prompt in inference.prompt_texts(processor, examples)]
        with inference._padding_side(processor, "left"):
            inputs = processor(
                text=texts,
                images=[ex["image"].convert("RGB") for ex in examples],
                return_tensors="pt",
                padding=True,
            )
        teach(
            model, inputs, len(processor.tokenizer(target, add_special_tokens=False)["input_ids"]), steps=40
        )
        forced_calls = []
        teacher_forced = inference.answer_probability
        monkeypatch.setattr(
            inference,
            "answer_probability",
            lambda model, processor, examples, completions, **kw: (
                forced_calls.append(len(examples))
                or teacher_forced(model, processor, examples, completions, **kw)
            ),
        )
        completions, p_yes = inference.generate_and_score(model, processor, examples, max_new_tokens=12)
        assert all(completion.startswith(target) for completion in completions), completions
        assert forced_calls == []  # every P(Yes) came from the generation
        np.testing.assert_allclose(p_yes, teacher_forced(model, processor, examples, completions), atol=1e-5)

    def test_follows_a_model_taught_to_answer_yes(self, small_model_dir, small_profile_path, examples):
        model, processor = load_model_and_processor(small_model_dir, load_profile(small_profile_path))
        completion = "<think></think><answer>Yes</answer>"
        before = inference.answer_probability(model, processor, examples, [completion] * 3)
        text = (
            inference.prompt_texts(processor, [examples[0]])[0]
            + inference.forced_answer_prefix(completion)
            + YES
        )
        inputs = processor(text=[text], images=[examples[0]["image"].convert("RGB")], return_tensors="pt")
        teach(model, inputs, len(processor.tokenizer(YES, add_special_tokens=False)["input_ids"]), steps=15)
        after = inference.answer_probability(model, processor, examples, [completion] * 3)
        assert after[0] > 0.9 > before[0]

    def test_without_completions_it_generates_them(self, loaded, examples):
        model, processor = loaded
        probabilities = inference.answer_probability(model, processor, examples[:1], max_new_tokens=4)
        assert probabilities.shape == (1,)

    def test_completion_count_must_match(self, loaded, examples):
        model, processor = loaded
        with pytest.raises(ValueError, match="one per example"):
            inference.answer_probability(model, processor, examples, ["x"])


def write_record(folder: Path) -> Path:
    """A 12-lead, 10 s, 500 Hz WFDB record with CinC-style age/sex comments."""
    wfdb = pytest.importorskip("wfdb")
    from ecg_r1.data.canonical import LEADS

    t = np.arange(5000) / 500
    signal = np.stack([0.8 * np.sin(2 * np.pi * 1.2 * t + k) for k in range(12)], axis=1)
    wfdb.wrsamp(
        "rec1",
        fs=500,
        units=["mV"] * 12,
        sig_name=list(LEADS),
        p_signal=signal,
        fmt=["16"] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        comments=["Age: 71", "Sex: Female", "Dx: 164934002"],
        write_dir=str(folder),
    )
    return folder / "rec1.hea"


class TestPredictCli:
    def test_prints_reasoning_answer_and_probability_from_a_folder(
        self, small_model_dir, small_profile_path, tmp_path, capsys
    ):
        from ecg_r1.cli import main

        record = write_record(tmp_path)
        code = main(
            [
                "predict",
                str(record),
                "--model",
                str(small_model_dir),
                "--profile",
                str(small_profile_path),
                "--note",
                "Chest pain, troponin 2.1",
                "--max-new-tokens",
                "6",
                "--json",
                "--save-image",
                str(tmp_path / "page.png"),
            ]
        )
        assert code == 0
        result = json.loads(capsys.readouterr().out)
        assert result["age"] == 71 and result["sex"] == "F" and result["note"] == "Chest pain, troponin 2.1"
        assert 0 < result["p_yes"] < 1
        assert (
            result["valid"] is False and result["problem"]
        )  # an untrained model breaks the format, and says so
        assert (tmp_path / "page.png").stat().st_size > 0

    def test_reads_a_registered_version(self, registry, small_model_dir, small_profile_path, capsys):
        from ecg_r1.cli import main
        from ecg_r1.tracking import model_registry
        from ecg_r1.tracking import runs as tracking

        with tracking.start_or_resume_run("tiny", "grpo") as run:
            version = model_registry.register_model_version(run.info.run_id, small_model_dir, "ecg-r1-grpo")
        record = write_record(registry / "records")
        args = [
            "predict",
            str(record),
            "--model",
            f"models:/ecg-r1-grpo/{version}",
            "--mlflow-root",
            str(registry),
        ]
        assert (
            main([*args, "--profile", str(small_profile_path), "--max-new-tokens", "4", "--age", "55"]) == 0
        )
        out = capsys.readouterr().out
        assert f"models:/ecg-r1-grpo/{version}" in out and "P(Yes):" in out and "answer:" in out

    def test_unknown_version_exits_with_a_message(self, registry):
        from ecg_r1.cli import main

        record = write_record(registry / "records")
        with pytest.raises(SystemExit, match="not in the registry"):
            main(
                ["predict", str(record), "--model", "models:/ecg-r1-grpo/77", "--mlflow-root", str(registry)]
            )


@pytest.fixture(scope="module")
def registry(tmp_path_factory, seed_mlflow_db):
    """A temporary MLflow store (the repository root holding mlflow/), shared: creating it takes seconds."""
    mlflow = pytest.importorskip("mlflow")
    from ecg_r1.tracking import runs as tracking

    root = tmp_path_factory.mktemp("repo")
    seed_mlflow_db(root / "mlflow" / "mlflow.db")
    (root / "records").mkdir()
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        tracking.configure(root)
        yield root
        mlflow.set_tracking_uri(previous)
