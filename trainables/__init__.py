"""leadtune.trainables: the ECG data layer, the tasks (one package each: lead_id, ...) and the
task-neutral training plumbing every task uses (:mod:`leadtune.trainables.training`)."""

if __name__ != "leadtune.trainables":  # imported as a bare top-level name: a second, unrelated copy
    raise ImportError(
        "import leadtune.trainables, not trainables: leadtune installs its folders under the leadtune namespace"
    )
