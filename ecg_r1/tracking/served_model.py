"""The code MLflow runs to build a served ECG-R1 model ("models from code": no pickle).

:func:`ecg_r1.tracking.serving.log_served_model` logs this file as the pyfunc's model code; MLflow
executes it when the model is loaded (``mlflow models serve``, ``mlflow.pyfunc.load_model``).
"""

import mlflow
from ecg_r1.tracking.serving import ECGR1Model

mlflow.models.set_model(ECGR1Model())
