"""Search spaces by name: what may vary in a search, as Optuna define-by-run functions.

A space is plain Python (see :mod:`leadtune.spaces.registry`); ``leadtune search --space NAME``
picks one.
"""

if __name__ != "leadtune.spaces":  # imported as a bare top-level name: a second, unrelated copy
    raise ImportError(
        "import leadtune.spaces, not spaces: leadtune installs its folders under the leadtune namespace"
    )

# Importing the modules registers their spaces.
from leadtune.spaces import diagnosis as _diagnosis  # noqa: E402,F401
from leadtune.spaces import lead_id as _lead_id  # noqa: E402,F401
from leadtune.spaces.registry import (
    DEFAULT_SPACE,
    SPACES,
    SearchSpace,
    get_space,
    register_space,
)

__all__ = ["DEFAULT_SPACE", "SPACES", "SearchSpace", "get_space", "register_space"]
