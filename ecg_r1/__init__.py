"""ECG-R1: tell ischemic from non-ischemic T-wave inversion on 12-lead ECGs with a VLM.

A plain library (no Dagster import): one module per pipeline stage. The Dagster project in
``dagster_project/`` and the ``ecg-r1`` CLI are thin callers of these modules.
"""

__version__ = "0.1.0"
