"""CsiError: a failure with the gRPC status code the CSI spec prescribes for it, and a message for the user."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @classmethod
    def invalid(cls, message: str) -> "CsiError":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def not_found(cls, message: str) -> "CsiError":
        return cls(grpc.StatusCode.NOT_FOUND, message)

    @classmethod
    def precondition(cls, message: str) -> "CsiError":
        return cls(grpc.StatusCode.FAILED_PRECONDITION, message)

    @classmethod
    def exhausted(cls, message: str) -> "CsiError":
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    @classmethod
    def exists(cls, message: str) -> "CsiError":
        return cls(grpc.StatusCode.ALREADY_EXISTS, message)

    @classmethod
    def internal(cls, message: str) -> "CsiError":
        return cls(grpc.StatusCode.INTERNAL, message)
