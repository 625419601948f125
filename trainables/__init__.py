"""Trainables: ECG data loading, models and the training functions that Ray Tune runs."""
