"""How much of the label do a model's image tokens carry? A linear probe of its vision tower.

    python -m research.probe_vision --model data/models/vision_model/model --out data/probe.json

Computes the tokens the language model receives for every labelled page of the train, val and
test splits, fits a logistic regression on the training split, chooses its regularisation on
val, and prints accuracy and AUROC with 95% bootstrap CIs on both test splits. Compare them with
a trained model's row without the note: a probe far above it means the language model does not
read what the tower shows. Reads the cohort, splits and images of the default layout (``data/``).

With ``--with-note`` it also fits a reader of the note's word flags (the feature baseline's) and
combines the two readers' log-odds on val: what the page and the note carry together for a linear
reader, to set beside a trained model's row with the note.

``--measurements`` prints how well the tokens show each measured finding (ridge R² per family on
val and both test splits: which finding the tower does not show); ``--boosted`` fits the feature
baseline's booster on the tokens' principal components with the age, sex and note a prompt holds,
and without the note (whether a non-linear reader of the prompt reaches the feature baseline).
On a simulated cohort, ``--drawn-findings TRUTH`` (the simulator's ``truth.parquet``) scores how
well the tokens show each yes/no ECG finding the simulator drew (T symmetry, ST depression, high
voltage, long QT, Q and U waves): AUROC of a linear and a boosted reader of the page alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from ecg_r1.constants import N_BOOT
from ecg_r1.data.split import TEST_EXTERNAL, TEST_INTERNAL, TRAIN, VAL
from ecg_r1.evaluation.baselines import clinical_numbers
from ecg_r1.evaluation.cases import add_features, evaluation_cases
from ecg_r1.evaluation.evaluate import labels_to_truth
from ecg_r1.evaluation.report import SPLIT_TITLES
from ecg_r1.modeling.models import load_model_and_processor
from ecg_r1.modeling.profiles import load_profile
from ecg_r1.simulate.truth import ECG_FINDINGS
from ecg_r1.training.vision_readout import REGRESSION_TARGETS, page_tokens
from research.probe import (
    ProbeResult,
    fit_boosted_probe,
    fit_measurement_probe,
    fit_page_and_note_probe,
    fit_probe,
)

ROOT = Path(__file__).resolve().parents[1]


def _reader_figures(result: ProbeResult) -> dict:
    """One reader's chosen C, val accuracy per C and test figures, for the JSON file."""
    return {
        "c": result.c,
        "val_accuracy": {str(c): a for c, a in result.selection_accuracy.items()},
        **{split: m.flat() for split, m in result.metrics.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder whose vision tower to probe")
    parser.add_argument("--profile", default="tiny", help="profile name or YAML path (default tiny)")
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="data folder (default data/)")
    parser.add_argument("--images", type=Path, default=None, help="page folder (default DATA/images)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--n-boot", type=int, default=N_BOOT)
    parser.add_argument(
        "--with-note", action="store_true", help="also a note reader and the page and note readers combined"
    )
    parser.add_argument(
        "--measurements", action="store_true", help="also R² of each measured finding read off the tokens"
    )
    parser.add_argument(
        "--boosted",
        action="store_true",
        help="also gradient boosting on the tokens' components, age, sex, note",
    )
    parser.add_argument(
        "--drawn-findings",
        type=Path,
        default=None,
        metavar="TRUTH",
        help="simulated cohort: AUROC of each yes/no ECG finding the simulator drew (its truth.parquet)",
    )
    args = parser.parse_args()

    model, processor = load_model_and_processor(args.model, load_profile(args.profile))
    images = args.images or args.data / "images"
    features, measured, clinical, drawn = {}, {}, {}, {}
    yes_no = [f.name for f in ECG_FINDINGS if f.categories == ("no", "yes")]
    truth = pl.read_parquet(args.drawn_findings).select("record_id", *yes_no) if args.drawn_findings else None
    for split in (TRAIN, VAL, TEST_INTERNAL, TEST_EXTERNAL):
        cases = evaluation_cases(args.data / "cohort", args.data / "splits" / "splits.parquet", images, split)
        tokens = page_tokens(model, processor, cases["image_path"].to_list())
        features[split] = (tokens, cases["note"].to_list(), labels_to_truth(cases["label"]))
        if args.measurements:
            measured[split] = add_features(cases, args.data / "cohort").select(REGRESSION_TARGETS).to_numpy()
        if args.boosted:
            clinical[split] = cases.select(clinical_numbers(cases)).to_numpy().astype(np.float64)
        if truth is not None:
            drawn[split] = cases.select("record_id").join(truth, on="record_id", how="left")
        print(f"{split}: {len(cases)} pages, {tokens.shape[1]} tokens x {tokens.shape[2]}", flush=True)
    tests = (TEST_INTERNAL, TEST_EXTERNAL)
    if args.with_note:
        both = fit_page_and_note_probe(
            features[TRAIN], features[VAL], {s: features[s] for s in tests}, n_boot=args.n_boot
        )
        readers = {"page": both.page, "note": both.note}
        print(f"page and note combined with weights {both.weights[0]:.2f}, {both.weights[1]:.2f} (log-odds)")
    else:
        page_only = {s: (features[s][0], features[s][2]) for s in features}
        result = fit_probe(
            page_only[TRAIN], page_only[VAL], {s: page_only[s] for s in tests}, n_boot=args.n_boot
        )
        readers = {"page": result}
    for name, result in readers.items():
        chosen = ", ".join(f"C {c:g}: {a:.3f}" for c, a in result.selection_accuracy.items())
        print(f"{name}: val accuracy per C ({chosen}); chosen C {result.c:g}")
        for split, m in result.metrics.items():
            print(f"{name}, {SPLIT_TITLES[split]}: n {m.n}, accuracy {m.accuracy}, AUROC {m.auroc}")
    if args.with_note:
        for split, m in both.metrics.items():
            print(f"page + note, {SPLIT_TITLES[split]}: n {m.n}, accuracy {m.accuracy}, AUROC {m.auroc}")
    figures = {"model": str(args.model), **_reader_figures(readers["page"])}
    if args.measurements:
        shown = fit_measurement_probe(
            (features[TRAIN][0], measured[TRAIN]),
            {s: (features[s][0], measured[s]) for s in (VAL, *tests)},
            REGRESSION_TARGETS,  # the measurements the vision pre-training teaches the tower
        )
        for split in (VAL, *tests):
            families = ", ".join(f"{name} {r2:.2f}" for name, r2 in shown.by_family(split).items())
            print(f"measurements read off the tokens, R² on {SPLIT_TITLES.get(split, split)}: {families}")
        figures["measurement_r2"] = shown.r2
    if args.boosted:
        inputs = {s: (features[s][0], clinical[s], features[s][1], features[s][2]) for s in features}
        for with_note in (True, False):
            boosted = fit_boosted_probe(
                inputs[TRAIN], {s: inputs[s] for s in tests}, with_note=with_note, n_boot=args.n_boot
            )
            name = "boosted page + age, sex" + (" + note" if with_note else "")
            for split, m in boosted.items():
                print(f"{name}, {SPLIT_TITLES[split]}: n {m.n}, accuracy {m.accuracy}, AUROC {m.auroc}")
            key = "boosted_with_note" if with_note else "boosted_without_note"
            figures[key] = {split: m.flat() for split, m in boosted.items()}
    if truth is not None:
        figures["drawn_findings"] = {}
        for name in yes_no:
            found = {s: (drawn[s][name] == "yes").fill_null(False).to_numpy() for s in drawn}
            page_only = {
                s: (features[s][0], np.zeros((len(found[s]), 0)), features[s][1], found[s]) for s in drawn
            }
            linear = fit_probe(
                (features[TRAIN][0], found[TRAIN]),
                (features[VAL][0], found[VAL]),
                {s: (features[s][0], found[s]) for s in tests},
                n_boot=args.n_boot,
            ).metrics
            boosted = fit_boosted_probe(
                page_only[TRAIN], {s: page_only[s] for s in tests}, with_note=False, n_boot=args.n_boot
            )
            shown = "; ".join(
                f"{SPLIT_TITLES[s]} AUROC linear {linear[s].auroc.value:.3f}, boosted {boosted[s].auroc.value:.3f}"
                for s in tests
            )
            print(f"drawn finding {name}: {shown}")
            figures["drawn_findings"][name] = {
                "linear": {s: m.flat() for s, m in linear.items()},
                "boosted": {s: m.flat() for s, m in boosted.items()},
            }
    if args.out is not None:
        if args.with_note:
            figures["note"] = _reader_figures(both.note)
            figures["page_and_note"] = {
                "weights": list(both.weights),
                **{split: m.flat() for split, m in both.metrics.items()},
            }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
