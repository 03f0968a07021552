"""Exception types shared by the loaders (a leaf module: it imports nothing from the package)."""


class ModelLoadError(ValueError):
    """A model dir (or a file in it) that cannot be loaded; the message says which and why."""
