"""Old spellings of a concept's name, accepted for one release with a DeprecationWarning.

Each concept has one name, the detector's parameter in :mod:`.params`, and the
code below the detector uses it too: ``kernel`` (which distance kernel runs;
once ``backend``), ``tolerance`` (how many grid steps a patch may be compared
across; once ``radius``) and ``coreset_ratio`` (the share of good patches a
location keeps; once ``ratio``).  The old keyword still works for one release
and warns; giving both the old and the new one is a TypeError.  Removing an
old name is deleting its entry here and the decorator's mention of it.
"""
from __future__ import annotations

import functools
import warnings

# Old keyword -> the one name of its concept.
OLD_NAMES = {"backend": "kernel", "radius": "tolerance", "ratio": "coreset_ratio"}


def warn(old: str, new: str, where: str, stacklevel: int = 3) -> None:
    """The DeprecationWarning for ``old`` used in ``where``, pointing at the caller's line."""
    warnings.warn(f"{where}: {old!r} is the old name of {new!r}; the old name goes in the next release",
                  DeprecationWarning, stacklevel=stacklevel)


def accepts_old_names(*old: str):
    """Decorator: the function also takes the keywords ``old`` (keys of :data:`OLD_NAMES`) under their old
    spelling, passed on under the new one with a DeprecationWarning."""
    for name in old:
        if name not in OLD_NAMES:
            raise ValueError(f"{name!r} is not an old name; known: {sorted(OLD_NAMES)}")

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for name in old:
                if name in kwargs:
                    new = OLD_NAMES[name]
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {new!r} and its old name {name!r}")
                    warn(name, new, f"{fn.__qualname__}()")
                    kwargs[new] = kwargs.pop(name)
            return fn(*args, **kwargs)
        return call
    return wrap


def old_attribute(new: str, old: str):
    """A read-only property under the old name ``old`` that warns and reads attribute ``new``."""
    def get(self):
        warn(old, new, f"{type(self).__name__}.{old}")
        return getattr(self, new)
    return property(get, doc=f"Old name of :attr:`{new}` (DeprecationWarning).")


__all__ = ["OLD_NAMES", "accepts_old_names", "old_attribute", "warn"]
