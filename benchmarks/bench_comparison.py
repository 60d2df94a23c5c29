"""How fast the comparison lets a model answer: cases per second of ``predict_cases`` (greedy
generation + P(Yes)) by batch size; side by side, the three ways of getting the answers with
P(Yes): generating and then teacher-forcing both answer words (the way before 2026-12-05),
generating and then one pass at the answer position, and ``generate_and_score`` (P(Yes) read
from the generation's own logits where the completion follows the contract); and the cost of
the bootstrap.

An untrained model never stops early and never writes the contract, so its completions run to
the cap and its P(Yes) is teacher-forced: the worst case. ``--model`` measures a trained one.

    .venv/bin/python benchmarks/bench_comparison.py [--cases 32] [--max-new-tokens 48]
    .venv/bin/python benchmarks/bench_comparison.py --profile smol --model FOLDER --max-new-tokens 16
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
    parser.add_argument(
        "--model",
        type=Path,
        help="a trained model folder of the profile (its completions follow the contract, so "
        "generate_and_score reads P(Yes) from the generation); default: an untrained base model",
    )
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
        model = args.model or build_base_model(profile, corpus_from_cases(rows), root / "model")
        print(f"profile {profile.name}, {args.cases} cases, completions of {args.max_new_tokens} tokens")
        for batch in (4, 8, 16):
            start = time.perf_counter()
            predict_cases(model, profile, cases, batch_size=batch, max_new_tokens=args.max_new_tokens)
            seconds = time.perf_counter() - start
            print(f"predict_cases batch {batch:2d}: {args.cases / seconds:6.2f} cases/s ({seconds:.1f} s)")

        # Answers and P(Yes), each way twice in turn (the faster run of each counts).
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

        def generate_then_force(one_pass: bool) -> None:
            completions = inference.generate(loaded, processor, examples, args.max_new_tokens, batch_size=8)
            with (
                contextlib.nullcontext()
                if one_pass
                else mock.patch.object(inference, "answer_token_ids", return_value=None)
            ):
                inference.answer_probability(loaded, processor, examples, completions, batch_size=8)

        ways = {
            "generate, then teacher-force both answer words": lambda: generate_then_force(one_pass=False),
            "generate, then one pass at the answer position": lambda: generate_then_force(one_pass=True),
            "generate_and_score (P(Yes) from the generation)": lambda: inference.generate_and_score(
                loaded, processor, examples, args.max_new_tokens, batch_size=8
            ),
        }
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(2):
            for way, run in ways.items():
                start = time.perf_counter()
                run()
                best[way] = min(best[way], time.perf_counter() - start)
        completions, _ = inference.generate_and_score(loaded, processor, examples[:1], args.max_new_tokens)
        print(f"answers with P(Yes), batch 8 (a completion: {completions[0]!r}):")
        slowest = max(best.values())
        for way, seconds in best.items():
            print(f"  {way}: {args.cases / seconds:6.2f} cases/s ({seconds:.2f} s, {slowest / seconds:.2f}x)")

    y = rng.random(1000) < 0.4
    pred = list(rng.random(1000) < 0.5)
    for n_boot in (200, 2000):
        start = time.perf_counter()
        evaluate_binary(y, pred, rng.random(1000), n_boot=n_boot)
        print(f"evaluate_binary, 1000 cases, {n_boot} resamples: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    main()
