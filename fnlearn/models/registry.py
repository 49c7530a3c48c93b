"""Model registry: look a model up by name instead of if/elif chains.

Each entry says what task it serves, so a recipe can offer (and check) only the
models it can train: an `"image_classifier"` takes (B, H, W, C) images, has
`num_classes` and `dtype` fields and an `apply(..., train=)` argument.
"""
_MODELS = {}


def register(name, factory, task=None):
    """Registers `factory` (a Module class or a `functools.partial` of one) as `name`, serving `task`."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = (factory, task)
    return factory


def get(name, **kwargs):
    """Builds the registered model `name`; `kwargs` override its fields (e.g. dtype)."""
    try:
        factory, _ = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}") from None
    return factory(**kwargs)


def names(task=None):
    """Sorted names of every registered model, or of those serving `task`."""
    return sorted(name for name, (_, t) in _MODELS.items() if task is None or t == task)
