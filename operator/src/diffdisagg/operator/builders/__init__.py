"""Pure manifest builders, one module per kind of child. Input: frozen dataclasses; output: plain dicts."""
