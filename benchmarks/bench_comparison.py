"""How fast the comparison lets a model answer: cases per second of ``predict_cases`` (greedy
generation + P(Yes)) on the tiny profile's model, by batch size; P(Yes) read in one pass at the
answer position against teacher-forcing both answer words, side by side; and the cost of the
bootstrap.

An untrained model never stops early, so every completion runs to the cap: the worst case.

    .venv/bin/python benchmarks/bench_comparison.py [--cases 32] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()

    import torch

    from ecg_r1.evaluation.evaluate import evaluate_binary
    from ecg_r1.evaluation.predictions import predict_cases
    from ecg_r1.imaging.draw import render_page
    from ecg_r1.imaging.png import save_png
    from ecg_r1.modeling import inference
    from ecg_r1.modeling.build import build_base_model, corpus_from_cases
    from ecg_r1.modeling.models import load_model_and_processor
    from ecg_r1.modeling.profiles import load_profile

    torch.set_num_threads(2)
    profile = load_profile(args.profile)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for i in range(args.cases):
            path = root / f"{i}.png"
            save_png(
                render_page(rng.normal(0, 0.3, (12, 5000)).astype(np.float32), profile.render_config()), path
            )
            rows.append(
                {"record_id": str(i), "image_path": str(path), "age": 60.0, "sex": "F", "note": "chest pain"}
            )
        cases = pl.DataFrame(rows)
        model = build_base_model(profile, corpus_from_cases(rows), root / "model")
        print(f"profile {profile.name}, {args.cases} cases, completions of {args.max_new_tokens} tokens")
        for batch in (4, 8, 16):
            start = time.perf_counter()
            predict_cases(model, profile, cases, batch_size=batch, max_new_tokens=args.max_new_tokens)
            seconds = time.perf_counter() - start
            print(f"predict_cases batch {batch:2d}: {args.cases / seconds:6.2f} cases/s ({seconds:.1f} s)")

        # P(Yes) of an answer-only completion, each way twice in turn (the faster run of each counts).
        loaded, processor = load_model_and_processor(model, profile)
        examples = [
            {
                **row,
                "image": render_page(
                    rng.normal(0, 0.3, (12, 5000)).astype(np.float32), profile.render_config()
                ).convert("RGB"),
            }
            for row in rows
        ]
        completions = ["<think></think><answer>Yes</answer>"] * len(examples)
        prefix = inference.prompt_texts(processor, examples[:1])[0] + inference.forced_answer_prefix(
            completions[0]
        )
        single = inference.answer_token_ids(processor.tokenizer, prefix) is not None
        print(f"answer words one token each: {'yes' if single else 'no (both ways score both words)'}")
        ways = {
            "one pass at the answer position": contextlib.nullcontext(),
            "both answer words teacher-forced": mock.patch.object(
                inference, "answer_token_ids", return_value=None
            ),
        }
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(2):
            for way, patch in ways.items():
                with patch:
                    start = time.perf_counter()
                    inference.answer_probability(loaded, processor, examples, completions, batch_size=8)
                    best[way] = min(best[way], time.perf_counter() - start)
        for way, seconds in best.items():
            print(f"P(Yes), {way}: {args.cases / seconds:6.2f} cases/s ({seconds:.2f} s)")
        one, both = best.values()
        print(f"P(Yes): one pass is {both / one:.2f}x as fast as teacher-forcing both words")

    y = rng.random(1000) < 0.4
    pred = list(rng.random(1000) < 0.5)
    for n_boot in (200, 2000):
        start = time.perf_counter()
        evaluate_binary(y, pred, rng.random(1000), n_boot=n_boot)
        print(f"evaluate_binary, 1000 cases, {n_boot} resamples: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
