"""ECG-R1: tell ischemic from non-ischemic T-wave inversion on 12-lead ECGs with a VLM.

A plain library (no Dagster import), one package per pipeline stage, in pipeline order:

* :mod:`ecg_r1.data`: ingest, label, check and split the records;
* :mod:`ecg_r1.simulate`: a simulated multi-hospital cohort (the embedded default data), written
  in the formats :mod:`ecg_r1.data` reads;
* :mod:`ecg_r1.imaging`: draw each record as the 12-lead page the model reads;
* :mod:`ecg_r1.modeling`: profiles, the Qwen2-VL model, prompts and inference;
* :mod:`ecg_r1.training`: vision pre-training, SFT and GRPO with TRL;
* :mod:`ecg_r1.evaluation`: metrics with intervals, baselines, comparison, report, promotion;
* :mod:`ecg_r1.tracking`: git/DVC provenance, MLflow runs and registered models;
* :mod:`ecg_r1.cli`: the ``ecg-r1`` command.

The Dagster project in ``dagster_project/`` and the CLI are thin callers of these packages.
"""

__version__ = "0.1.0"
