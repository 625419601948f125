"""Search spaces by name: what may vary in a search, as Optuna define-by-run functions.

A space is plain Python (see :mod:`spaces.registry`); ``leadtune search --space NAME`` picks one.
"""

# Importing the modules registers their spaces.
from spaces import lead_id as _lead_id  # noqa: E402,F401
from spaces.registry import SPACES, SearchSpace, get_space, register_space

__all__ = ["SPACES", "SearchSpace", "get_space", "register_space"]
