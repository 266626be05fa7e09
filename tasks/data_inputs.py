"""Checking and normalising what a task is told about its data at construction (class names, normalisation,
input size), so a missing or inconsistent fact fails when the task is built, naming the task and the fact.

Values become plain tuples of ``str``/``float``/``int``: they are recorded in the checkpoint's hyper-parameters,
which ``torch.load(weights_only=True)`` reads back only when they hold no foreign types.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

Number = Union[int, float]


def require(task: str, **values: Any) -> None:
    """Raise ``ValueError`` naming every argument of ``values`` that is None."""
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"{task} needs {', '.join(missing)} (run.py passes the data module's attributes of these "
                         f"names; give them when building the task yourself)")


def float_tuple(value: Union[None, Number, Sequence[Number]]) -> Optional[tuple[float, ...]]:
    """``0.5`` or ``[0.5, 0.5]`` as a tuple of floats; None stays None."""
    if value is None:
        return None
    return (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def size_pair(value: Union[None, int, Sequence[int]]) -> Optional[tuple[int, int]]:
    """``224`` or ``[224, 224]`` as ``(height, width)``; None stays None."""
    if value is None:
        return None
    height, width = (value, value) if isinstance(value, int) else value
    return int(height), int(width)


def class_name_tuple(names: Optional[Sequence[str]], count: int, task: str) -> Optional[tuple[str, ...]]:
    """Class names as a tuple of ``count`` strings; None stays None; a list of another length is refused."""
    if names is None:
        return None
    names = tuple(str(name) for name in names)
    if len(names) != count:
        raise ValueError(f"{task}: {len(names)} class names for {count} classes: {list(names)[:5]}...")
    return names
