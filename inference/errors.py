"""Errors raised by the inference core; each says what is wrong in one line.

InferenceError
├── ModelNotFoundError        unknown model name, missing directory or file
├── WeightFileError           a weight file is missing, unreadable or lacks a tensor
├── UnsupportedArchitectureError
├── LayerRangeError           a block span outside [0, L) or empty
├── SessionError              unknown session, or a step at the wrong position
└── CacheFullError            the KV cache has no room now for a session's step
    └── RequestTooLarge       the session would not fit even an empty cache
"""


class InferenceError(Exception):
    """Base class of every error the inference core raises on purpose."""


class ModelNotFoundError(InferenceError):
    pass


class WeightFileError(InferenceError):
    pass


class UnsupportedArchitectureError(InferenceError):
    pass


class LayerRangeError(InferenceError):
    pass


class SessionError(InferenceError):
    pass


class CacheFullError(InferenceError):
    pass


class RequestTooLarge(CacheFullError):
    pass
