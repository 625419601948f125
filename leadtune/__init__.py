"""leadtune: hyperparameter search for ECG deep learning (the command-line entry point lives here)."""

__version__ = "0.2.0"
