"""``ecg-r1 predict RECORD --model models:/ecg-r1-grpo/N``: read one record, render it as the model
sees it, and print the model's reasoning, its answer and P(Yes)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ecg_r1.modeling.profiles import DEFAULT_PROFILE

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="answer whether a record's T-wave inversion is ischemic, with the model's reasoning",
        description="Read one WFDB record (.hea/.mat/.dat), render it at the profile's model size, and "
        "print the model's reasoning, its answer (Yes = ischemic) and its probability of Yes. Age and sex "
        "default to the record header's comments where it has them.",
    )
    parser.add_argument(
        "record", type=Path, help="record header or signal file (or the path without extension)"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME/VERSION or models:/NAME@ALIAS from the MLflow registry, or a model folder",
    )
    parser.add_argument("--note", default=None, help="clinical note shown to the model (default: none given)")
    parser.add_argument("--age", type=float, default=None, help="age in years (default: from the header)")
    parser.add_argument("--sex", choices=["M", "F"], default=None, help="sex (default: from the header)")
    parser.add_argument(
        "--profile",
        default=None,
        help="model profile (default: the one recorded in the model folder, else 'tiny')",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="completion cap (default: the profile's)"
    )
    add_mlflow_root(parser)
    parser.add_argument(
        "--save-image", type=Path, default=None, help="also write the rendered page to this PNG"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def add_mlflow_root(parser: argparse.ArgumentParser) -> None:
    """The ``--mlflow-root`` option of the commands that load registered models."""
    from ecg_r1.constants import REPO_ROOT

    parser.add_argument(
        "--mlflow-root",
        type=Path,
        default=REPO_ROOT,
        help=f"repository root holding mlflow/ (the registry); default: this project's, {REPO_ROOT}",
    )


def resolve_model_dir(model: str, mlflow_root: Path) -> Path:
    """A local model folder for ``--model``: a registry URI is fetched, a folder is used as is."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    if not model.startswith("models:/"):
        raise SystemExit(
            f"--model {model!r} is neither a model folder nor a models:/NAME/VERSION registry URI"
        )
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    try:
        model_registry.parse_model_uri(model)  # a malformed URI is refused before any store is touched
        tracking.open_store(mlflow_root)
        return model_registry.load_registered(model)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def header_demographics(meta: dict[str, Any]) -> tuple[float | None, str | None]:
    """Age and sex from a record's parsed header comments (``# Age: 63``, ``# Sex: Female``)."""
    from ecg_r1.data.readers.cinc import parse_age, parse_sex

    comments = meta.get("comments") or {}
    return parse_age(comments.get("age")), parse_sex(comments.get("sex"))


def run(args: argparse.Namespace) -> int:
    from ecg_r1.data.readers import read_record
    from ecg_r1.imaging.draw import render_page
    from ecg_r1.imaging.png import save_png
    from ecg_r1.modeling import inference
    from ecg_r1.modeling.device import resolve_device
    from ecg_r1.modeling.models import MODEL_INFO_FILE, load_model_and_processor
    from ecg_r1.modeling.profiles import load_profile

    try:
        record = read_record(args.record)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read record {args.record}: {exc}") from exc
    model_dir = resolve_model_dir(args.model, args.mlflow_root)
    info_file = model_dir / MODEL_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    profile = load_profile(args.profile or info.get("profile") or DEFAULT_PROFILE)
    age, sex = header_demographics(record.meta)
    example = {
        "image": render_page(record.signal, profile.render_config()),
        "age": args.age if args.age is not None else age,
        "sex": args.sex or sex,
        "note": args.note,
    }
    if args.save_image is not None:
        save_png(example["image"], args.save_image)
    model, processor = load_model_and_processor(model_dir, profile, device=resolve_device(profile))
    max_new_tokens = args.max_new_tokens or profile.max_completion_length
    [answer] = inference.predict(model, processor, [example], max_new_tokens=max_new_tokens)
    result = {
        "record": str(args.record),
        "model": args.model,
        "profile": profile.name,
        "age": example["age"],
        "sex": example["sex"],
        "note": example["note"],
        **answer,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"record:    {result['record']}")
    where = f"{model_dir}, " if str(model_dir) != args.model else ""
    print(f"model:     {args.model} ({where}profile {profile.name})")
    if answer["valid"]:
        print(f"reasoning: {answer['reasoning'] or '(empty)'}")
        from ecg_r1.data.labels import ISCHEMIC, NON_ISCHEMIC
        from ecg_r1.modeling.contract import YES

        verdict = ISCHEMIC if answer["answer"] == YES else NON_ISCHEMIC
        print(f"answer:    {answer['answer']} ({verdict} T-wave inversion)")
    else:
        print(f"output:    {answer['completion']!r}")
        print(f"answer:    none: the output breaks the answer format ({answer['problem']})")
    print(f"P(Yes):    {result['p_yes']:.3f}")
    return 0
