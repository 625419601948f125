"""leadtune.search: Ray Tune + Optuna searches, MLflow runs, resume, and promotion to the
model registry. It names no task: everything task-specific comes from the task's spec
(:mod:`leadtune.trainables.tasks`)."""

if __name__ != "leadtune.search":  # imported as a bare top-level name: a second, unrelated copy
    raise ImportError(
        "import leadtune.search, not search: leadtune installs its folders under the leadtune namespace"
    )
