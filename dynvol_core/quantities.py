"""Kubernetes resource quantities (``10m``, ``50Mi``, ``1.5Gi``, ``1e3``), parsed exactly.

The grammar is the API's (``k8s.io/apimachinery/pkg/api/resource``)::

    quantity  ::= [sign] number [suffix]
    number    ::= digits | digits "." [digits] | "." digits
    suffix    ::= Ki | Mi | Gi | Ti | Pi | Ei | n | u | m | k | M | G | T | P | E
                | ("e" | "E") [sign] digits

Values are kept as :class:`decimal.Decimal` so that ``1Gi == 1073741824`` and ``0.5 == 500m``
compare exactly, which is what a ``request <= limit`` check needs.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

import attrs

__all__ = ["Quantity", "parse_quantity"]

_QUANTITY = re.compile(
    r"(?P<sign>[+-]?)(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>[eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?"
)
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Quantities longer than this are certainly typos; it also bounds the work done here.
_MAX_TEXT = 64
# Exponents beyond this are outside anything the API would accept as a resource amount.
_MAX_EXPONENT = 100


@attrs.frozen(order=True)
class Quantity:
    """A parsed quantity. Equality and order use the numeric value, not the spelling."""

    value: Decimal
    text: str = attrs.field(eq=False, order=False)

    @property
    def is_negative(self) -> bool:
        """Whether the amount is below zero (never valid for a resource request or limit)."""
        return self.value < 0

    def __str__(self) -> str:
        return self.text


def parse_quantity(text: str) -> Quantity:
    """Parse ``text`` as a Kubernetes quantity.

    :raises ValueError: with a message saying what a quantity looks like.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a string quantity such as 100m or 64Mi, not {text!r}")
    match = _QUANTITY.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if match is None:
        raise ValueError(
            f"{text!r} is not a quantity: use a number with an optional suffix, "
            "e.g. 100m, 0.5, 64Mi, 1Gi or 1e3"
        )
    number = Decimal(match["number"])
    if match["sign"] == "-":
        number = -number
    suffix = match["suffix"] or ""
    with decimal.localcontext() as ctx:
        # Exact for any accepted spelling: at most 64 digits times 1024**6.
        ctx.prec = 200
        if suffix in _BINARY:
            value = number * (Decimal(1024) ** _BINARY[suffix])
        else:
            exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:])
            if abs(exponent) > _MAX_EXPONENT:
                raise ValueError(f"{text!r} is not a quantity: exponent out of range")
            value = number.scaleb(exponent)
    return Quantity(value=value, text=text)
