"""Errors that become HTTP answers: status code, a message, and optional details for the JSON body."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class ServingError(Exception):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.details}


class BadRequest(ServingError):
    status = HTTPStatus.BAD_REQUEST


class UnknownEntities(ServingError):
    """No usable online features for some instances: we answer nothing rather than a made-up prediction."""

    status = HTTPStatus.NOT_FOUND


class TooManyInstances(ServingError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class FeaturesUnavailable(ServingError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
