"""Model registry: look a model up by name instead of if/elif chains.

Each entry says what task it serves, so a recipe can offer (and check) only the
models it can train: an `"image_classifier"` takes (B, H, W, C) images, has
`num_classes` and `dtype` fields and an `apply(..., train=)` argument. An entry may
also declare a data-dependent init, so a recipe asks the registry instead of
looking for a model's parameter names.
"""
from typing import Any, Callable, NamedTuple, Optional


class Entry(NamedTuple):
    """What the registry keeps per model.

    Attributes:
      factory: a Module class or a `functools.partial` of one.
      task: what the model serves (e.g. "image_classifier"), or None.
      data_init: `(variables, images) -> variables`, run after `model.init` with
        (N, H, W, C) normalised float training images; None if the model has none.
    """
    factory: Callable[..., Any]
    task: Optional[str] = None
    data_init: Optional[Callable[[Any, Any], Any]] = None


_MODELS = {}


def register(name, factory, task=None, data_init=None):
    """Registers `factory` as `name`, serving `task`, with an optional data-dependent init.

    Args:
      name: the name `get` looks up.
      factory: a Module class or a `functools.partial` of one.
      task: what the model serves (e.g. "image_classifier"); `names(task=)` filters on it.
      data_init: `(variables, images) -> variables` that sets params from (N, H, W, C)
        normalised float training images after `model.init` (e.g. a whitening stem).
    Returns:
      `factory`, unchanged.
    """
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = Entry(factory, task, data_init)
    return factory


def _entry(name):
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}") from None


def get(name, **kwargs):
    """Builds the registered model `name`; `kwargs` override its fields (e.g. dtype)."""
    return _entry(name).factory(**kwargs)


def data_init(name):
    """The data-dependent init registered with `name`, `(variables, images) -> variables`, or None.

    `images` are (N, H, W, C) normalised float training images (a sample of a few
    thousand serves); the returned variables replace those from `model.init`.
    """
    return _entry(name).data_init


def names(task=None):
    """Sorted names of every registered model, or of those serving `task`."""
    return sorted(name for name, entry in _MODELS.items() if task is None or entry.task == task)
