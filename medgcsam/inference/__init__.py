"""Batch inference and model packaging.

``package`` logs/loads classifiers (MLflow registry, runs, checkpoints); ``predict`` runs one over a
folder. Import them from their modules: ``predict`` must not pull in MLflow on a serving machine.
"""
