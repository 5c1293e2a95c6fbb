"""Error types raised by the slm_ros core.

Every error a user can meet is an :class:`SlmError` whose message names the problem (which field,
which file, which model). Third-party exceptions are wrapped with that context.
"""


class SlmError(Exception):
    """Base class of every slm_ros error."""


class ConfigError(SlmError):
    """A node or backend setting is invalid (bad value, unknown backend, missing model path)."""


class RequestError(SlmError):
    """A generation request is invalid; the request gets a final error chunk with this message."""


class ImageError(RequestError):
    """An image cannot be used: bad size or step, unknown encoding, corrupt JPEG/PNG, no frame."""


class ModelLoadError(SlmError):
    """A model checkpoint could not be found, prepared or loaded."""


class BackendUnavailable(SlmError):
    """A backend cannot run on this machine (missing package, no GPU); the message says why."""


class BackendError(SlmError):
    """Generation failed inside the backend after the request was accepted (a remote server refused
    it, the stream was cut, a timeout passed); the request's final chunk carries this message."""
