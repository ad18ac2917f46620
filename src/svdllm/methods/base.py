"""The method registry: one frozen options dataclass per method, its factoriser registered by options type."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from torch import Tensor

from ..errors import OptionError
from ..whitening import Factorization

from ..calibration import Stat

if TYPE_CHECKING:
    from ..calibration import LayerStats


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options; subclasses set ``name`` and add their own fields."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def validate(self) -> None:
        """Raise OptionError naming the field when a value is out of range."""

    def extra_needs(self) -> frozenset[Stat]:
        """Statistics these option values add to the method's own (output whitening: the output Grams)."""
        return frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **asdict(self)}


def check_range(options: Any, name: str, low: float, high: float, what: str = "") -> None:
    """Raise OptionError naming ``name`` unless the field is a finite number in [low, high] (nan and inf refused)."""
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OptionError(name, f"must be in [{low:g}, {high:g}]{what}, got {value!r}")


Factorizer = Callable[[Tensor, "LayerStats", int, Any], tuple[Factorization, dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    options: type[MethodOptions]
    factorize: Factorizer
    needs: frozenset[Stat]  # the statistics the factoriser reads whatever its options
    summary: str

    def needs_for(self, options: MethodOptions) -> frozenset[Stat]:
        return self.needs | options.extra_needs()

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def sequential(self) -> bool:
        """Needs the compressed model's own activations (X′), so blocks go in order."""
        return Stat.COMP in self.needs


METHODS: dict[str, Method] = {}
_BY_OPTIONS: dict[type[MethodOptions], Method] = {}


def register(options: type[MethodOptions], needs: frozenset[Stat], summary: str) -> Callable[[Factorizer], Factorizer]:
    """Decorator: ``factorize(weight, stats, rank, options)`` becomes the method for ``options``."""

    def deco(fn: Factorizer) -> Factorizer:
        method = Method(options, fn, needs, summary)
        METHODS[options.name] = _BY_OPTIONS[options] = method
        return fn

    return deco


def method_of(options: MethodOptions) -> Method:
    try:
        return _BY_OPTIONS[type(options)]
    except KeyError:
        raise OptionError("method", f"no method is registered for {type(options).__name__}") from None


def options_for(name: str, **values: Any) -> MethodOptions:
    """Options of the method called ``name``; values left as None keep their defaults."""
    if name not in METHODS:
        raise OptionError("method", f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name].options
    known = {f.name for f in fields(cls)}
    given = {k: v for k, v in values.items() if v is not None}
    for key in given.keys() - known:
        owners = [m for m, meth in METHODS.items() if key in {f.name for f in fields(meth.options)}]
        raise OptionError(key, f"does not apply to method {name} (it applies to {', '.join(owners) or 'no method'})")
    opts = cls(**given)
    opts.validate()
    return opts

