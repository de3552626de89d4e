"""The code MLflow runs to build the served model (models-from-code: nothing is unpickled on load)."""

import mlflow

from medgcsam.inference.pyfunc import ImageClassifier

mlflow.models.set_model(ImageClassifier())
