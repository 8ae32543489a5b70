"""The arithmetic of the ``throttle`` filter: limits, their parsing and validation, and the
leaky buckets, as QEMU's ``util/throttle.c``. Pure: no I/O and no clock of its own -- every
call that needs the time is handed ``now_ns``, so the tests drive it with a fake clock.

Six buckets, one per limit: ``bps-total``, ``bps-read``, ``bps-write`` (bytes per second) and
``iops-total``, ``iops-read``, ``iops-write`` (requests per second). A bucket fills by what each
admitted request costs and leaks at its average rate (``avg``). A request may start while the
bucket holds no more than its size:

- without a burst rate (``max`` 0), a tenth of a second of ``avg``: short bursts pass
  unthrottled, otherwise every other request would wait;
- with one, ``max * max_length``: the bucket absorbs a burst at up to ``max`` for ``max_length``
  seconds, and a second bucket (``burst_level``), leaking at ``max`` and holding a tenth of a
  second of it, keeps the burst itself at ``max``.

A request over the limit waits until enough has leaked: ``extra / rate`` seconds. The request
is charged when it starts, in full, so one large request may take the bucket past its size and
the next ones wait for it. With ``iops-size``, a request of ``n`` bytes counts as
``n / iops-size`` requests when that is more than one.

Validation follows QEMU's ``throttle_is_valid``, with its messages, naming the option at fault.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from vdiskfs.errors import RangeError, VdiskError
from vdiskfs.units import parse_size

__all__ = [
    "BUCKETS",
    "NS_PER_SECOND",
    "VALUE_MAX",
    "BucketLimit",
    "Direction",
    "ThrottleLimits",
    "ThrottleSpec",
    "ThrottleState",
    "parse_throttle",
]

NS_PER_SECOND = 1_000_000_000
#: QEMU's ``THROTTLE_VALUE_MAX``: the largest rate (and burst rate times length) accepted.
VALUE_MAX = 10**15
#: QEMU takes ``*-max-length`` as an unsigned int.
MAX_LENGTH_MAX = (1 << 32) - 1
#: Longest group name: it shows in stats files and messages.
GROUP_NAME_MAX = 128


class Direction(enum.IntEnum):
    READ = 0
    WRITE = 1


#: The buckets in QEMU's order; ``bps-*`` count bytes, ``iops-*`` requests.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
# Which buckets a request of each direction fills and waits on: (bytes buckets, ops buckets).
_BPS = {Direction.READ: (0, 1), Direction.WRITE: (0, 2)}
_OPS = {Direction.READ: (3, 4), Direction.WRITE: (3, 5)}
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class BucketLimit:
    """One limit: ``avg`` units per second (0: none), bursts at up to ``max`` (0: none) for
    ``max_length`` seconds."""

    avg: int = 0
    max: int = 0
    max_length: int = 1


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """Every limit of one throttle group, in :data:`BUCKETS` order, and ``iops-size``."""

    buckets: tuple[BucketLimit, ...] = field(default_factory=lambda: (BucketLimit(),) * 6)
    iops_size: int = 0

    @property
    def enabled(self) -> bool:
        """Whether any limit is set (QEMU's ``throttle_enabled``)."""
        return any(b.avg for b in self.buckets)

    def options(self) -> str:
        """The limits as the options that set them (``bps-read=52428800,iops-total=2000``):
        what the control file shows, and what writing it back sets again."""
        parts: list[str] = []
        for name, bucket in zip(BUCKETS, self.buckets, strict=True):
            if bucket.avg:
                parts.append(f"{name}={bucket.avg}")
            if bucket.max:
                parts.append(f"{name}-max={bucket.max}")
            if bucket.max_length != 1:
                parts.append(f"{name}-max-length={bucket.max_length}")
        if self.iops_size:
            parts.append(f"iops-size={self.iops_size}")
        return ",".join(parts)


@dataclass(frozen=True, slots=True)
class ThrottleSpec:
    """What one ``--throttle`` or ``--disk ...,throttle.*`` asks for: limits (None when only a
    group was named, to join the limits another member sets) and the group's name."""

    limits: ThrottleLimits | None
    group: str | None = None


def _option_error(source: str, option: str, message: str) -> VdiskError:
    return RangeError(message, path=source, field=option)


def _number(source: str, option: str, value: str, *, size: bool) -> int:
    """A non-negative integer option; ``size``: with the suffixes of sizes (``50M``)."""
    text = value.strip()
    if text.startswith("-"):
        raise _option_error(source, option, f"{value!r} is negative; a limit is a positive "
                            "number (leave the option out for no limit)")
    if size:
        try:
            number = parse_size(text, what=option)
        except VdiskError as exc:
            raise _option_error(source, option, exc.message) from None
    elif text.isdigit():
        number = int(text)
    else:
        raise _option_error(source, option, f"{value!r} is not a whole number")
    if number == 0:
        # QEMU reads 0 as "no limit"; written out, it is more likely a mistake (a rate meant
        # in other units, a variable left empty) than a wish for no limit, which leaving the
        # option out says.
        raise _option_error(source, option, f"{value!r} is zero; a limit is a positive number "
                            "(leave the option out for no limit)")
    return number


def parse_throttle(text: str, *, source: str = "--throttle", prefix: str = "") -> ThrottleSpec:
    """``bps-read=50M,iops-total=2000[,group=NAME]`` -> a validated :class:`ThrottleSpec`.

    Keys are QEMU's throttle option names; byte rates and ``iops-size`` take size suffixes
    (k, M, G: powers of 1024), request rates and ``*-max-length`` (seconds) plain numbers.
    Every error is a :class:`~vdiskfs.errors.RangeError` (EINVAL) naming ``source`` and the
    option, spelt ``prefix + key`` (``throttle.bps-read`` in a ``--disk``).
    """
    values: dict[str, int] = {}
    group: str | None = None
    seen: set[str] = set()
    valid = [*BUCKETS, *(f"{b}-max" for b in BUCKETS), *(f"{b}-max-length" for b in BUCKETS),
             "iops-size", "group"]
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("_", "-")
        option = f"{prefix}{key}"
        if key not in valid:
            raise _option_error(source, option, "unknown throttle option; valid: "
                                + ", ".join(f"{prefix}{k}" for k in valid))
        if not sep or not value.strip():
            raise _option_error(source, option, "needs a value (KEY=VALUE)")
        if key in seen:
            raise _option_error(source, option, "given twice")
        seen.add(key)
        if key == "group":
            group = value.strip()
            if len(group) > GROUP_NAME_MAX or not _GROUP.match(group):
                raise _option_error(source, option, f"{group[:40]!r} is not a group name: "
                                    f"letters, digits, '.', '_', '-', at most {GROUP_NAME_MAX}")
            continue
        values[key] = _number(source, option, value,
                              size=(key.startswith("bps") and not key.endswith("-length"))
                              or key == "iops-size")
    if not values:
        return ThrottleSpec(None, group)
    buckets = tuple(
        BucketLimit(values.get(name, 0), values.get(f"{name}-max", 0),
                    values.get(f"{name}-max-length", 1))
        for name in BUCKETS
    )
    limits = ThrottleLimits(buckets, values.get("iops-size", 0))
    validate(limits, source=source, prefix=prefix)
    return ThrottleSpec(limits, group)


def validate(limits: ThrottleLimits, *, source: str, prefix: str = "") -> None:
    """QEMU's ``throttle_is_valid`` and ``throttle_limits_to_config`` checks, its messages."""
    b = limits.buckets

    def conflict(index: int, attr: str) -> str | None:
        total = getattr(b[index], attr)
        if total and (getattr(b[index + 1], attr) or getattr(b[index + 2], attr)):
            return BUCKETS[index] + ("-max" if attr == "max" else "")
        return None

    for index in (0, 3):
        for attr in ("avg", "max"):
            option = conflict(index, attr)
            if option is not None:
                raise _option_error(source, prefix + option, "bps/iops/max total values and "
                                    "read/write values cannot be used at the same time")
    if limits.iops_size and not (b[3].avg or b[4].avg or b[5].avg):
        raise _option_error(source, prefix + "iops-size",
                            "iops size requires an iops value to be set")
    if limits.iops_size > VALUE_MAX:
        raise _option_error(source, prefix + "iops-size", f"must be within [0, {VALUE_MAX}]")
    for name, bucket in zip(BUCKETS, b, strict=True):
        if bucket.avg > VALUE_MAX or bucket.max > VALUE_MAX:
            option = name if bucket.avg > VALUE_MAX else f"{name}-max"
            raise _option_error(source, prefix + option,
                                f"bps/iops/max values must be within [0, {VALUE_MAX}]")
        length = f"{prefix}{name}-max-length"
        if bucket.max_length > MAX_LENGTH_MAX:
            raise _option_error(source, length, f"value must be in the range "
                                f"[0, {MAX_LENGTH_MAX}]")
        if not bucket.max_length:
            raise _option_error(source, length, "the burst length cannot be 0")
        if bucket.max_length > 1 and not bucket.max:
            raise _option_error(source, length, "burst length set without burst rate")
        if bucket.max and bucket.max_length > VALUE_MAX // bucket.max:
            raise _option_error(source, length, "burst length too high for this burst rate")
        if bucket.max and not bucket.avg:
            raise _option_error(source, f"{prefix}{name}-max",
                                "bps_max/iops_max require corresponding bps/iops values")
        if bucket.max and bucket.max < bucket.avg:
            raise _option_error(source, f"{prefix}{name}-max",
                                "bps_max/iops_max cannot be lower than bps/iops")


class _Bucket:
    """The mutable state of one leaky bucket (QEMU's ``LeakyBucket``)."""

    __slots__ = ("avg", "burst_length", "burst_level", "level", "max")

    def __init__(self, limit: BucketLimit) -> None:
        self.avg = limit.avg
        self.max = limit.max
        self.burst_length = limit.max_length
        self.level = 0.0
        self.burst_level = 0.0

    def leak(self, delta_ns: int) -> None:
        self.level = max(self.level - self.avg * delta_ns / NS_PER_SECOND, 0.0)
        if self.burst_length > 1:
            # A burst longer than a second: the burst bucket keeps it at max per second.
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS_PER_SECOND, 0.0)

    def fill(self, units: float) -> None:
        self.level += units
        if self.burst_length > 1:
            self.burst_level += units

    def wait_ns(self) -> int:
        """Nanoseconds until a request may start; 0: now."""
        if not self.avg:
            return 0
        if not self.max:
            size, burst_size = self.avg / 10, 0.0
        else:
            size, burst_size = self.max * self.burst_length, self.max / 10
        extra = self.level - size
        if extra > 0:
            return int(extra * NS_PER_SECOND / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra * NS_PER_SECOND / self.max)
        return 0


class ThrottleState:
    """The six buckets of one group (QEMU's ``ThrottleState``), driven by the caller's clock."""

    limits: ThrottleLimits
    _buckets: list[_Bucket]
    _previous_leak: int

    def __init__(self, limits: ThrottleLimits, now_ns: int) -> None:
        self.configure(limits, now_ns)

    def configure(self, limits: ThrottleLimits, now_ns: int) -> None:
        """New limits; every bucket starts empty, as QEMU's ``throttle_config`` does."""
        self.limits = limits
        self._buckets = [_Bucket(limit) for limit in limits.buckets]
        self._previous_leak = now_ns

    def levels(self) -> tuple[float, ...]:
        """Each bucket's level, in :data:`BUCKETS` order (for tests and statistics)."""
        return tuple(bucket.level for bucket in self._buckets)

    def _leak(self, now_ns: int) -> None:
        delta = now_ns - self._previous_leak
        self._previous_leak = now_ns
        if delta > 0:
            for bucket in self._buckets:
                bucket.leak(delta)

    def wait_ns(self, direction: Direction, now_ns: int) -> int:
        """Leak what the time since the last call lets out, then the nanoseconds a request
        of ``direction`` must wait before it may start (0: it may start now)."""
        self._leak(now_ns)
        buckets = self._buckets
        return max(buckets[i].wait_ns() for i in (*_BPS[direction], *_OPS[direction]))

    def account(self, direction: Direction, size: int) -> None:
        """Charge a request of ``size`` bytes that starts now."""
        op_size = self.limits.iops_size
        units = size / op_size if op_size and size > op_size else 1.0
        for i in _BPS[direction]:
            self._buckets[i].fill(size)
        for i in _OPS[direction]:
            self._buckets[i].fill(units)

