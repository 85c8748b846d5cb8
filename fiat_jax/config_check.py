"""Type checks for the gin-configurable dataclasses: a wrong value fails at construction naming Class.field."""
import dataclasses
import numbers
import types
import typing
from typing import Any


def _matches(value: Any, hint: Any) -> bool:
  """Whether `value` fits the annotation `hint` (int for float is fine; a bool is never a number)."""
  if hint is Any or hint is object:
    return True
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, a) for a in args)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if origin in (tuple, list, typing.Sequence, typing.get_origin(typing.Sequence[int])):
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
      return False
    if origin is tuple and args and args[-1] is not Ellipsis:
      return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    return not args or all(_matches(v, args[0]) for v in value)
  if isinstance(hint, type):
    return isinstance(value, hint)
  return True  # an annotation this check does not model (a TypeVar, a Callable): left to the code that uses it


def _describe(hint: Any) -> str:
  return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def check(obj) -> None:
  """Raises TypeError naming the first field of dataclass `obj` whose value does not fit its annotation."""
  cls = type(obj)
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    if not _matches(value, hints[field.name]):
      raise TypeError(f"{cls.__name__}.{field.name}: {value!r} ({type(value).__name__}) is not "
                      f"{_describe(hints[field.name])}; fix the gin binding (--gin.{cls.__name__}.{field.name}=...)")


def typed(cls):
  """Class decorator, placed under @dataclass (so that dataclass's __init__ calls the __post_init__ it sets):
  `check` runs first, then the class's own __post_init__ if it has one."""
  post_init = getattr(cls, "__post_init__", None)

  def __post_init__(self):
    check(self)
    if post_init is not None:
      post_init(self)

  cls.__post_init__ = __post_init__
  return cls
