"""Talking to the kube-apiserver: a JSON client, resource descriptors and project errors."""

from .client import Client
from .errors import (
    APIConflict,
    APIError,
    APIForbidden,
    APIGone,
    APIInvalid,
    APINotFound,
)
from .resources import Resource

__all__ = [
    "APIConflict",
    "APIError",
    "APIForbidden",
    "APIGone",
    "APIInvalid",
    "APINotFound",
    "Client",
    "Resource",
]
