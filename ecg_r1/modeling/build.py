"""Models built here: the tiny Qwen2-VL (a tokenizer trained on the cohort's texts, a random
initialisation from the profile's sizes) and the starting model folder of any profile.

:func:`build_base_model` is what the ``base_model`` asset and ``ecg-r1 train`` call; a pretrained
language source goes to :mod:`ecg_r1.modeling.pretrained`, a hub profile to its checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ecg_r1.data.canonical import LEADS
from ecg_r1.modeling.contract import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    NO,
    SYSTEM_PROMPT,
    THINK_CLOSE,
    THINK_OPEN,
    YES,
    format_target,
)
from ecg_r1.modeling.findings import rationale_from_findings
from ecg_r1.modeling.processor import (
    EOS_TOKEN,
    PAD_TOKEN,
    QWEN2_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
)
from ecg_r1.modeling.profiles import Profile, TinyArchitecture
from ecg_r1.modeling.prompts import user_text
from ecg_r1.modeling.qwen2_vl import qwen2_vl_config, save_built_model
from ecg_r1.modeling.sources import TINY_SOURCE


def corpus_from_cases(cases: Iterable[Mapping[str, Any]]) -> list[str]:
    """Texts for training the tiny tokenizer: each case's user message and target completions.

    Args:
        cases: mappings with ``age``, ``sex``, ``note`` and optionally ``twi_leads`` and the
            measured features a findings rationale states (rows of the cohort table, as dicts).

    Returns:
        A list of strings: for every case its prompt text, and both possible targets with the
        rationale from its findings (the tokenizer must not learn which answer goes with which
        case, only the words).
    """
    texts = []
    for case in cases:
        texts.append(user_text(case.get("age"), case.get("sex"), case.get("note")))
        rationale = rationale_from_findings(case.get("twi_leads"), case)
        texts.extend((format_target(True, rationale), format_target(False, rationale)))
    return texts


def _contract_texts() -> list[str]:
    # Always in the tokenizer corpus, so the output contract's words exist even for a tiny corpus.
    return [
        SYSTEM_PROMPT,
        f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}{YES}{ANSWER_CLOSE}",
        f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}{NO}{ANSWER_CLOSE}",
        " ".join(LEADS),
        "system\nuser\nassistant\n",
    ]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE tokenizer with the Qwen special tokens and the Qwen2-VL chat template.

    Byte-level means any text encodes (no unknown token); the corpus only decides which merges
    exist. In transformers 5.x ``Qwen2Tokenizer`` ignores ``tokenizer_object``, so the trained
    tokenizer is wrapped in ``PreTrainedTokenizerFast``.

    Args:
        corpus: training texts (prompts and answers); the contract's words are always added.
        vocab_size: upper bound on the vocabulary (BPE stops earlier on a small corpus).
        min_frequency: a pair must occur this often to become a merge.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad ``<|endoftext|>`` and eos ``<|im_end|>``.

    Raises:
        ValueError: when the corpus is empty.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("the tokenizer corpus is empty: pass the cohort's prompts and answers")
    # The system prompt and the contract's tags are in every example the model sees; weighting
    # them as such lets BPE merge their words, which shortens every prompt (a once-seen word
    # stays split into bytes and pieces).
    texts.extend(_contract_texts() * max(2, len(texts) // 3))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_base_model(profile: Profile, corpus: list[str], out_dir: Path) -> Path:
    """Produce the starting model folder of a profile.

    For ``tiny``: trains the tokenizer on ``corpus``, builds a randomly initialised Qwen2-VL
    (seeded by ``profile.seed``) and saves model, tokenizer, processor and an
    ``ecg_r1_model.json`` summary into ``out_dir``. For a pretrained-language source
    (``smollm2-135m``): converts the installed weights into a Qwen2-VL with a new vision tower
    (:func:`ecg_r1.modeling.pretrained.build_pretrained_language_model`) and saves it the same way. For hub
    profiles: nothing is built; a local folder is returned as is, a hub id is resolved to its
    local snapshot (downloaded by ``huggingface_hub`` where there is internet).

    Args:
        profile: the profile.
        corpus: texts for the tokenizer (see :func:`corpus_from_cases`); only the tiny profile
            trains a tokenizer, the others ignore it.
        out_dir: where a built model folder is written (created; existing files are replaced).

    Returns:
        The folder to load with :func:`load_model_and_processor`.

    Raises:
        ValueError: when the corpus is empty (tiny) or a hub checkpoint cannot be resolved.
    """
    if profile.vision is not None:
        from ecg_r1.modeling.pretrained import build_pretrained_language_model

        return build_pretrained_language_model(profile, out_dir)
    if not profile.is_tiny:
        return resolve_source(profile.source)
    return build_random_model(profile, profile.tiny, corpus, out_dir, source=TINY_SOURCE)


def build_random_model(
    profile: Profile, sizes: TinyArchitecture, corpus: list[str], out_dir: Path, source: str
) -> Path:
    """A randomly initialised Qwen2-VL of ``sizes`` (seeded by ``profile.seed``) with a tokenizer
    trained on ``corpus`` (Qwen2-VL's special tokens and chat template), saved as a model folder:
    the tiny model, and the stand-in checkpoint of a GPU profile (``ecg-r1 random-model``).

    ``sizes.text.vocab_size`` above the tokenizer's gives the embedding that many rows, as the
    real checkpoints have more rows than tokens (Qwen2-VL-2B: 151,936).
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = train_tokenizer(
        corpus,
        vocab_size=int(sizes.tokenizer.get("vocab_size", 1024)),
        min_frequency=int(sizes.tokenizer.get("min_frequency", 2)),
    )
    config = qwen2_vl_config(sizes.text, sizes.vision, tokenizer)
    torch.manual_seed(profile.seed)
    model = Qwen2VLForConditionalGeneration(config)
    return save_built_model(
        profile, model, tokenizer, out_dir, info={"source": source, "corpus_texts": len(corpus)}
    )


def resolve_source(source: str | Path) -> Path:
    """A local folder for a model source: the folder itself, or a hub id's local snapshot.

    Raises:
        ValueError: when the source is neither an existing folder nor a reachable hub id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: it is not a model folder")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as exc:  # offline, unknown id, gated repo: all mean "get the weights first"
        raise ValueError(
            f"cannot resolve model {source!r}: not a local folder and the hub did not answer ({exc}). "
            "Download the checkpoint on a machine with internet (huggingface-cli download ...) and set "
            "model.source in the profile to that folder."
        ) from exc


def checkpoint_record(folder: str | Path, source: str) -> dict[str, str]:
    """What a pretrained checkpoint is, for the stages that start from it: its ``source`` (the hub
    id or folder named), its local ``model_dir``, and the hub ``revision`` (the commit of a hub
    snapshot folder) or, for a folder of one's own, ``content_sha256`` over its files' names and
    bytes, so a changed folder is a different base model.
    """
    import hashlib

    folder = Path(folder).resolve()
    record = {"source": str(source), "model_dir": str(folder)}
    if folder.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<commit>
        record["revision"] = folder.name
        return record
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    record["content_sha256"] = digest.hexdigest()
    return record
