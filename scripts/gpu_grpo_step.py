"""Measure GRPO steps of a 2B-sized Qwen2-VL on a GPU: step time, tokens/s, peak memory.

The model has the architecture of Qwen/Qwen2-VL-2B-Instruct (its config is written out below, so
nothing is downloaded) with random weights: the cost of a step depends on the shapes, not on the
values. Random weights never emit the end-of-turn token, so every completion runs to
``--completion-tokens``: the figures are the worst case for that length. The tokenizer is the
project's tiny byte-level BPE (its ids are a subset of the 151,936-entry vocabulary, and the
embedding and output layers keep the real size, so their cost is the real one).

Usage:
    python scripts/gpu_grpo_step.py                      # on a GPU: bf16, 2B model, 3 steps
    python scripts/gpu_grpo_step.py --steps 5 --generations 8 --completion-tokens 256
    python scripts/gpu_grpo_step.py --tiny               # the same code on CPU at tiny size (a check)

Prints one JSON object: step seconds (each and mean after the first), prompt and completion
tokens per step, tokens/s, samples/s, peak GPU memory (allocated and reserved) and process RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("gpu_grpo_step")

# Qwen/Qwen2-VL-2B-Instruct config.json (the fields that set the shapes and the rotary layout).
QWEN2_VL_2B_TEXT = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN2_VL_2B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": None,  # the tokenizer's own size: the check need not pay for a 152k-row output layer
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
}
TINY_VISION = {**QWEN2_VL_2B_VISION, "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4}


def synthetic_signal(rng: np.random.Generator) -> np.ndarray:
    """A plausible 10 s 12-lead beat train (QRS and T bumps) in mV, for rendering a page."""
    from ecg_r1.data.canonical import FS, N_SAMPLES

    t = np.arange(N_SAMPLES) / FS
    out = np.zeros((12, N_SAMPLES))
    rr = 60.0 / rng.uniform(55, 95)
    for lead in range(12):
        r, tw = rng.uniform(0.5, 1.5), rng.uniform(-0.4, 0.4)
        for beat in np.arange(0.4, 9.5, rr):
            out[lead] += r * np.exp(-0.5 * ((t - beat) / 0.015) ** 2) + tw * np.exp(
                -0.5 * ((t - beat - 0.3) / 0.05) ** 2
            )
    return out.astype(np.float32)


def build(tiny: bool, image_width: int, workdir: Path) -> tuple[object, object]:
    """The model (random weights) and the project's processor for it."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ecg_r1.modeling.build import corpus_from_cases, train_tokenizer
    from ecg_r1.modeling.processor import (
        EOS_TOKEN,
        PAD_TOKEN,
        QWEN2_VL_CHAT_TEMPLATE,
        _processor_class,
        make_image_processor,
    )
    from ecg_r1.modeling.profiles import load_profile

    profile = load_profile("tiny")
    tokenizer = train_tokenizer(
        corpus_from_cases([{"age": 60, "sex": "M", "note": "chest pain", "twi_leads": "V1,V2"}])
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    text = dict(TINY_TEXT if tiny else QWEN2_VL_2B_TEXT)
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    text.update(
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        bos_token_id=None,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(TINY_VISION if tiny else QWEN2_VL_2B_VISION),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    # Bound the image tokens to what a page of this width gives (the 2B profile's 896 px -> ~790).
    profile = dataclasses.replace(profile, image_max_pixels=28 * 28 * 1024)
    processor = _processor_class()(
        make_image_processor(profile), tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    return model, processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (checks the script runs)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps to time (the first is a warm-up)")
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--completion-tokens", type=int, default=256, help="max_completion_length")
    parser.add_argument("--image-width", type=int, default=896, help="rendered page width in pixels")
    parser.add_argument(
        "--beta", type=float, default=0.04, help="KL coefficient (>0 adds the reference model)"
    )
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.tiny:
        args.image_width = min(args.image_width, 224)
        args.generations = min(args.generations, 2)
        args.completion_tokens = min(args.completion_tokens, 16)

    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from ecg_r1.imaging.draw import render_page
    from ecg_r1.imaging.page import CLINICAL, with_size
    from ecg_r1.modeling.prompts import build_prompt
    from ecg_r1.training.rewards import accuracy_reward, format_reward

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --tiny to check the script on CPU")
    started = time.perf_counter()
    model, processor = build(args.tiny, args.image_width, Path(tempfile.mkdtemp()))
    n_params = sum(p.numel() for p in model.parameters())
    # GRPOTrainer builds its KL reference model from the policy's folder, so the random model is
    # saved once and both are loaded from there.
    model_dir = Path(tempfile.mkdtemp()) / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    del model
    build_s = time.perf_counter() - started
    logger.info("built a %s-parameter Qwen2-VL in %.1f s", f"{n_params:,}", build_s)

    rng = np.random.default_rng(0)
    config = with_size(CLINICAL, args.image_width)
    n_rows = args.prompts * (args.steps + 1)
    rows = {
        "prompt": [
            build_prompt(float(rng.integers(30, 85)), "M", "Chest pain for two hours, troponin pending.")
            for _ in range(n_rows)
        ],
        "image": [render_page(synthetic_signal(rng), config).convert("RGB") for _ in range(n_rows)],
        "label": [bool(rng.integers(0, 2)) for _ in range(n_rows)],
    }
    dataset = datasets.Dataset.from_dict(rows)
    batch = args.prompts * args.generations
    grpo_args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.completion_tokens,
        beta=args.beta,
        learning_rate=1e-6,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=not args.tiny,
        gradient_checkpointing=not args.tiny and not args.no_gradient_checkpointing,
        disable_tqdm=True,
        seed=0,
        model_init_kwargs={"dtype": torch.float32 if args.tiny else torch.bfloat16},
    )
    step_times: list[float] = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t)

    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[format_reward, accuracy_reward],
        args=grpo_args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[Timer()],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    tokens_per_step = (logs[-1]["num_tokens"] / len(logs)) if logs else float("nan")
    completion_tokens = float(np.mean([h.get("completions/mean_length", 0) for h in logs])) * batch
    timed = step_times[1:] or step_times
    mean_step = float(np.mean(timed))
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "tiny": args.tiny,
        "parameters": n_params,
        "build_seconds": round(build_s, 1),
        "prompts_per_step": args.prompts,
        "generations": args.generations,
        "completion_tokens_max": args.completion_tokens,
        "image_width": args.image_width,
        "beta": args.beta,
        "gradient_checkpointing": grpo_args.gradient_checkpointing,
        "step_seconds": [round(s, 3) for s in step_times],
        "mean_step_seconds_after_first": round(mean_step, 3),
        "tokens_per_step": round(tokens_per_step),
        "completion_tokens_per_step": round(completion_tokens),
        "tokens_per_second": round(tokens_per_step / mean_step, 1),
        "completion_tokens_per_second": round(completion_tokens / mean_step, 1),
        "samples_per_second": round(batch / mean_step, 2),
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
