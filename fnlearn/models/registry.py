"""Model registry: look a model up by name instead of if/elif chains."""
_MODELS = {}


def register(name, factory):
    """Registers `factory` (a Module class or a `functools.partial` of one) as `name`."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = factory
    return factory


def get(name, **kwargs):
    """Builds the registered model `name`; `kwargs` override its fields (e.g. dtype)."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}") from None
    return factory(**kwargs)


def names():
    """Sorted names of every registered model."""
    return sorted(_MODELS)
