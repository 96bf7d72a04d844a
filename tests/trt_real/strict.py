"""A strict fake of TensorRT made FROM the real Python bindings (setup_bindings.py imports them
without a GPU). Only the classes whose constructors need a GPU (Builder, Runtime, OnnxParser)
and what they hand out are stand-ins; the module, its enums, Logger and Dims are the real ones.

Every stand-in object is checked against the real class it replaces:
  * an attribute that the real class lacks is an AttributeError, as it would be;
  * a method call is bound against the real pybind overloads (parsed from `__doc__`: names,
    defaults, argument types, with pybind's conversions: int for SupportsInt, any real number
    for SupportsFloat, a list/tuple of ints for Dims, a buffer for Buffer); no overload that
    takes the call -> TypeError, as pybind raises;
  * what a call returns is checked against the declared return type (bool is bool, a class is
    a stand-in of that class or None);
  * a property without a setter refuses assignment; a setter's value is type-checked.
What a call does is the behaviour model's (tests/trt_real/sim.py): a method or property the
model lacks fails loudly (StrictError), so nothing is silently invented.
"""
from __future__ import annotations

import inspect
import numbers
import operator
import re
import types
from typing import Dict, List, Optional, Tuple


class StrictError(AssertionError):
    """The code under test did something the real TensorRT would refuse, or the behaviour
    model does not cover what it did."""


def _split_top(s: str) -> List[str]:
    """Split at ', ' outside brackets (types like list[Dims], defaults like <Enum.X: 0>)."""
    out, depth, cur = [], 0, ""
    i = 0
    while i < len(s):
        ch = s[i]
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if depth == 0 and s.startswith(", ", i):
            out.append(cur)
            cur, i = "", i + 2
            continue
        cur += ch
        i += 1
    if cur:
        out.append(cur)
    return out


class Overload:
    """One pybind overload: parameters (name, type, has default) after self, return type."""

    def __init__(self, params: List[Tuple[str, str, Optional[str]]], ret: str, text: str):
        self.params, self.ret, self.text = params, ret, text
        kinds = []
        for name, _, default in params:
            kind = (inspect.Parameter.POSITIONAL_ONLY if re.fullmatch(r"arg\d+", name)
                    else inspect.Parameter.POSITIONAL_OR_KEYWORD)
            kinds.append(inspect.Parameter(name, kind, default=inspect.Parameter.empty if default is None else default))
        self.sig = inspect.Signature(kinds)


def overloads(doc: str, name: str) -> List[Overload]:
    """The overloads a pybind docstring declares (`name` is '' for property accessors)."""
    out = []
    for line in doc.splitlines():
        m = re.match(r"^(?:\d+\. )?" + re.escape(name) + r"\((.*)\) -> (.+)$", line.strip())
        if not m or m.group(1) == "*args, **kwargs":
            continue
        params = []
        for p in _split_top(m.group(1)):
            pname, _, rest = p.partition(": ")
            typ, _, default = rest.partition(" = ")
            params.append((pname, typ, default or None))
        out.append(Overload(params[1:], m.group(2).strip(), line.strip()))     # [0] is self / arg0
    if not out:
        raise StrictError(f"no pybind signature for {name or 'a property'} in {doc[:120]!r}")
    return out


class Types:
    """pybind's argument conversions and return types, against the real module `trt`."""

    def __init__(self, trt):
        self.trt = trt

    def real(self, typ: str):
        m = re.fullmatch(r"(?:tensorrt_bindings\.)?tensorrt\.(\w+)", typ)
        return getattr(self.trt, m.group(1)) if m else None

    def accepts(self, v, typ: str, default: Optional[str] = None) -> bool:
        if v is None and default == "None":
            return True
        m = re.fullmatch(r"(?:typing\.)?Optional\[(.+)\]|(.+) \| None", typ)
        if m:
            return v is None or self.accepts(v, m.group(1) or m.group(2))
        if typ == "str":
            return isinstance(v, str)
        if typ == "bool":
            return isinstance(v, bool)
        if typ in ("int", "typing.SupportsInt"):            # pybind: an int, or what __index__ makes one
            try:
                operator.index(v)
                return True
            except (TypeError, ValueError, RuntimeError):
                return False
        if typ in ("float", "typing.SupportsFloat"):
            return isinstance(v, numbers.Real)
        if typ in ("tuple", "list", "dict"):
            return isinstance(v, {"tuple": tuple, "list": list, "dict": dict}[typ])
        if typ in ("typing_extensions.Buffer", "buffer", "collections.abc.Buffer"):
            try:
                memoryview(v)
                return True
            except TypeError:
                return False
        m = re.fullmatch(r"(?:collections\.abc\.|typing\.)?Sequence\[(.+)\]|(?:typing\.)?[Ll]ist\[(.+)\]", typ)
        if m:
            return isinstance(v, (list, tuple)) and all(self.accepts(x, m.group(1) or m.group(2)) for x in v)
        cls = self.real(typ)
        if cls is None:
            raise StrictError(f"the strict fake cannot check an argument of type {typ!r}")
        if isinstance(v, Stand):
            return issubclass(v._real, cls)
        if cls is self.trt.Dims and isinstance(v, (list, tuple)):     # pybind implicit conversion
            return all(self.accepts(x, "typing.SupportsInt") for x in v)
        return isinstance(v, cls)

    def returns(self, v, typ: str) -> bool:
        if typ == "None":
            return v is None
        if typ == "bool":
            return isinstance(v, bool)
        if typ == "int":
            return isinstance(v, int) and not isinstance(v, bool)
        if typ == "float":
            return isinstance(v, float)
        if typ == "str":
            return isinstance(v, str)
        m = re.fullmatch(r"(?:typing\.)?[Ll]ist\[(.+)\]", typ)
        if m:
            return isinstance(v, list) and all(self.returns(x, m.group(1)) for x in v)
        cls = self.real(typ) or _by_short_name(self.trt, typ)
        if cls is None:
            raise StrictError(f"the strict fake cannot check a return value of type {typ!r}")
        if isinstance(v, Stand):
            return issubclass(v._real, cls)
        return v is None or isinstance(v, cls)    # a class result may be None (a null pointer)


def _by_short_name(trt, typ: str):
    """'nvonnxparser::IParserError' and the like: the real class of that name."""
    return getattr(trt, re.split(r"[.:]", typ)[-1], None)


def bind(ovs: List[Overload], types_: Types, what: str, args: tuple, kwargs: dict) -> Tuple[Overload, Dict]:
    """The first overload that takes the call (pybind's rule), and the given arguments by name."""
    why = []
    for ov in ovs:
        try:
            b = ov.sig.bind(*args, **kwargs)
        except TypeError as e:
            why.append(f"{ov.text}: {e}")
            continue
        bad = [n for n, v in b.arguments.items()
               if not types_.accepts(v, *next((t, d) for pn, t, d in ov.params if pn == n))]
        if bad:
            why.append(f"{ov.text}: {', '.join(f'{n}={b.arguments[n]!r}' for n in bad)} of the wrong type")
            continue
        return ov, dict(b.arguments)
    raise TypeError(f"{what}(): incompatible function arguments (strict fake of the real bindings): "
                    + " | ".join(why))


class Stand:
    """Base of the stand-in classes; `_real` is the real class, `_m` the behaviour model."""
    _real: type
    _types: Types


def _static(cls: type, name: str):
    for c in cls.__mro__:
        if name in c.__dict__:
            return c.__dict__[name]
    raise AttributeError(f"'{cls.__name__}' object has no attribute '{name}'")


def _call(self, name: str, ovs, args, kwargs):
    real = type(self)._real
    ov, named = bind(ovs, type(self)._types, f"{real.__name__}.{name}", args, kwargs)
    fn = getattr(self._m, name, None)
    if fn is None:
        raise StrictError(f"the behaviour model does not cover {real.__name__}.{name}")
    out = fn(**named)
    if not type(self)._types.returns(out, ov.ret):
        raise StrictError(f"{real.__name__}.{name} returned {out!r}, the real one returns {ov.ret}")
    return out


def _getattribute(self, name: str):
    if name.startswith("__") or name in ("_m", "_real", "_types"):
        return object.__getattribute__(self, name)
    cls = type(self)
    attr = _static(cls._real, name)                    # AttributeError, as the real class raises
    if isinstance(attr, property):
        (ov,) = overloads(attr.fget.__doc__, "")[:1]
        if not hasattr(self._m, name):
            raise StrictError(f"the behaviour model does not cover {cls._real.__name__}.{name}")
        v = getattr(self._m, name)
        if not cls._types.returns(v, ov.ret):
            raise StrictError(f"{cls._real.__name__}.{name} is {v!r}, the real one is {ov.ret}")
        return v
    ovs = overloads(attr.__doc__ or "", name)
    return types.MethodType(lambda s, *a, **kw: _call(s, name, ovs, a, kw), self)


def _setattr(self, name: str, value):
    if name == "_m":
        return object.__setattr__(self, name, value)
    cls = type(self)
    attr = _static(cls._real, name)
    if not isinstance(attr, property):
        raise AttributeError(f"'{cls._real.__name__}' object attribute '{name}' is read-only")
    if attr.fset is None:
        raise AttributeError(f"property '{name}' of '{cls._real.__name__}' object has no setter")
    bind(overloads(attr.fset.__doc__, ""), cls._types, f"{cls._real.__name__}.{name}", (value,), {})
    setattr(self._m, name, value)


def stand_in(real: type, types_: Types, model_factory=None):
    """A class standing in for `real`. Constructed by the code under test (model_factory given:
    the arguments are bound against the real `__init__`), or by the behaviour model (`wrap`).
    IHostMemory stands in as bytes: the real one has the buffer protocol."""
    def __new__(cls, *args, **kwargs):
        if model_factory is None:
            raise TypeError(f"tensorrt.{real.__name__}: No constructor defined!")
        _, named = bind(overloads(real.__init__.__doc__, "__init__"), types_, f"{real.__name__}.__init__", args, kwargs)
        return wrap(cls, model_factory(**named))

    def __init__(self, *a, **kw):
        pass

    ns = dict(_real=real, _types=types_, __getattribute__=_getattribute, __setattr__=_setattr,
              __new__=__new__, __init__=__init__, __repr__=lambda s: f"<strict {real.__name__}>")
    base = (bytes, Stand) if real.__name__ == "IHostMemory" else (Stand,)
    return type(f"Strict{real.__name__}", base, ns)


def wrap(cls, model, data: bytes = b""):
    """A stand-in of class `cls` over `model` (bytes stand-ins hold `data`)."""
    obj = bytes.__new__(cls, data) if issubclass(cls, bytes) else object.__new__(cls)
    object.__setattr__(obj, "_m", model)
    return obj
