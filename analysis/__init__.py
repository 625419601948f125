"""leadtune.analysis: what users do with finished searches and models: reports, evaluation,
export and explanations, reading what searches and training wrote. Each task's own parts (its
evaluation suites, ``leadtune label``, its attributions) come from its delivery package
(:mod:`leadtune.analysis.delivery`)."""

if __name__ != "leadtune.analysis":  # imported as a bare top-level name: a second, unrelated copy
    raise ImportError(
        "import leadtune.analysis, not analysis: leadtune installs its folders under the leadtune namespace"
    )


def load_model(model: str | None = None, tracking_uri: str | None = None, cache_dir=None):
    """A trained leadtune model, by any name the commands accept: ``"bundled"``,
    ``"models:/lead-id@champion"`` (with ``tracking_uri``), a run id, a model package, a
    checkpoint or an exported folder. Returns a :class:`~leadtune.analysis.model_source.
    LoadedModel` (``.model`` is the torch module in eval mode; ``.leads``, ``.fs`` and
    ``.preprocess`` say what input it expects). Loads tensors and plain data only."""
    from leadtune.analysis.model_source import load_model as resolve

    return resolve(model, tracking_uri, cache_dir)
