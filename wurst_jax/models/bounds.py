"""Sanity bounds on the configs read from files (config.json, `convert --config`): nothing runs away.

A config.json with `depth` 10**6 would have the abstract parameter tree built for minutes before any weight is
compared; a width of 10**9 would overflow on the way. The bounds are derived, per config class, from the configs of
the released models of every kind that uses the class (`ComponentSpec.released` in the registry):

- every integer value at most `FACTOR` × the largest released value of that key (over list entries too);
- every list at most `FACTOR` × the longest list of a released config of the class (levels, block types per
  level), every string at most `FACTOR` × the longest released value of its key;
- the number of blocks a config builds and runs (`ComponentSpec.blocks`: layers, residual blocks, repeats)
  at most `FACTOR` × the largest released model's.

`FACTOR` is 8: far beyond any released model (wider or deeper fine-tunes included), while the deepest config
allowed still builds in seconds to tens of seconds (a 256-deep prior's abstract tree: 38 s on a loaded 2-core CPU,
where depth 10**4 takes about half an hour). `bounds_table()` lists the bounds. Configs built in Python are not
checked.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

FACTOR = 8


@dataclasses.dataclass(frozen=True)
class Limit:
    """What the released values of one key allow: the largest number, the longest list or string, and the same
    for list entries. None: the key has no such values (a float key, a key that is never a list)."""

    number: int | None = None
    length: int | None = None
    items: Limit | None = None


def _limit(values: list[Any], entries: int) -> Limit:
    """The Limit of one key's released values; `entries` bounds its lists (one bound per class, as per-level lists
    of one config have one length)."""
    ints = [abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
    strings = [len(v) for v in values if isinstance(v, str)]
    items = [x for v in values if isinstance(v, (tuple, list)) for x in v]
    length = (
        FACTOR * max(max(strings), 1) if strings else entries if any(isinstance(v, tuple) for v in values) else None
    )
    return Limit(
        FACTOR * max(max(ints), 1) if ints else None,
        length,
        _limit(items, entries) if items else None,
    )


def _released(cls: type) -> list[Any]:
    from wurst_jax.models import registry

    names = dict.fromkeys(n for s in registry.specs() if s.config is cls for n in s.released)
    return [getattr(cls, n)() for n in names]


@functools.cache
def limits(cls: type) -> tuple[dict[str, Limit], int | None]:
    """(key → Limit, the bound on blocks) for a config class; empty without released configs."""
    from wurst_jax.models import registry

    released = _released(cls)
    values = {f.name: [getattr(c, f.name) for c in released] for f in dataclasses.fields(cls)}
    longest = max((len(v) for vs in values.values() for v in vs if isinstance(v, tuple)), default=1)
    keys = {k: _limit(vs, FACTOR * longest) for k, vs in values.items()} if released else {}
    count = next((s.blocks for s in registry.specs() if s.config is cls and s.blocks), None)
    blocks = FACTOR * max(count(c) for c in released) if released and count else None
    return keys, blocks


def check_values(cls: type, raw: Mapping[str, Any], name: str, prefix: str = "") -> None:
    """Refuse a config.json value beyond its bound (before the config is built); `name` is the file and `prefix`
    the keys' section ("model.stage_c."), for messages."""
    keys, _ = limits(cls)
    for key, value in raw.items():
        if key in keys:
            _check(value, keys[key], prefix + key, name)


def _check(value: Any, limit: Limit, key: str, name: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)) and limit.number is not None:
        if not abs(value) <= limit.number:  # NaN too
            raise ValueError(f"{name}: key '{key}' is {_short(value)}, beyond the sanity bound {_why(limit.number)}")
    elif isinstance(value, (list, tuple, str)) and limit.length is not None:
        if len(value) > limit.length:
            raise ValueError(
                f"{name}: key '{key}' has {len(value)} entries, beyond the sanity bound {_why(limit.length)}"
            )
        if not isinstance(value, str) and limit.items is not None:
            for i, x in enumerate(value):
                _check(x, limit.items, f"{key}[{i}]", name)


def _short(value: float) -> str:
    """The value for a message: a 4000-digit integer as its size."""
    if isinstance(value, float) or abs(value) < 10**30:
        return repr(value)
    return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"


def check_blocks(config: Any, name: str) -> None:
    """Refuse a config that builds more blocks than its bound (after it was built from checked values)."""
    from wurst_jax.models import registry

    _, bound = limits(type(config))
    count = next((s.blocks for s in registry.specs() if s.config is type(config) and s.blocks), None)
    if bound is not None and count is not None and (n := count(config)) > bound:
        raise ValueError(f"{name}: the config builds {n} blocks, beyond the sanity bound {_why(bound)}")


def _why(bound: int) -> str:
    return f"{bound} ({FACTOR} × {bound // FACTOR}, the largest released model's)"


def bounds_table() -> str:
    """The bounds as Markdown rows: config class, key, largest number, longest list (README, "Model configs")."""
    from wurst_jax.models import registry

    rows = ["| config | key | at most | entries at most |", "|---|---|---|---|"]
    for cls in dict.fromkeys(s.config for s in registry.specs()):
        keys, blocks = limits(cls)
        for key, lim in keys.items():
            item = lim.items
            number = lim.number if lim.number is not None else (item.number if item else None)
            if number is not None or lim.length is not None:
                rows.append(f"| {cls.__name__} | {key} | {number or '–'} | {lim.length or '–'} |")
        if blocks:
            rows.append(f"| {cls.__name__} | (blocks built) | {blocks} | – |")
    return "\n".join(rows)
