"""Searches: Ray Tune + Optuna, MLflow runs, resume, and promotion to the model registry."""
