"""Typed errors raised by gradsparse.

Every error derives from :class:`GradSparseError` and from the matching builtin
(``ValueError``/``TypeError``), so ``except ValueError`` keeps working.

Example::

    >>> from gradsparse import TopK
    >>> try:
    ...     TopK(0.0)
    ... except ValueError as e:
    ...     print(type(e).__name__)
    InvalidConfigError
"""


class GradSparseError(Exception):
    """Base class of every gradsparse error."""


class InvalidConfigError(GradSparseError, ValueError):
    """A compressor, schedule or hook was configured with an impossible value."""


class ConfigTypeError(InvalidConfigError, TypeError):
    """A configuration argument has the wrong type (a string for a number, a class for an instance).

    Catchable as ``TypeError`` and as :class:`InvalidConfigError` / ``ValueError``.
    """


class UnsupportedGradientError(GradSparseError, TypeError):
    """The gradient has a dtype gradsparse cannot compress (integer, complex, bool)."""


class BucketError(GradSparseError, ValueError):
    """A bucket is empty or too large for int32 indices."""


class PayloadError(GradSparseError, ValueError):
    """A payload is malformed, or not the size agreed for it; nothing was written to the destination."""


class PayloadTypeError(PayloadError, TypeError):
    """A payload handed to a communicator is not a flat ``uint8`` tensor.

    Catchable as ``TypeError`` and as :class:`PayloadError` / ``ValueError``.
    """


class NonFiniteGradientError(GradSparseError, FloatingPointError):
    """Some rank produced NaN/Inf gradients and the policy is ``nonfinite="raise"``."""


class HookAlreadyRegisteredError(GradSparseError, RuntimeError):
    """A communication hook is already registered on this DDP model."""


class IncompatibleOptimizerError(GradSparseError, ValueError):
    """The optimizer would apply momentum a second time on top of DGC's momentum correction."""


class StateMismatchError(GradSparseError, ValueError):
    """A checkpointed state does not match the compressor, world size or parameters it is loaded into."""


class CommunicationError(GradSparseError, RuntimeError):
    """A collective failed: a peer exited, the network dropped, or the collective timed out."""


class CollectiveOrderError(GradSparseError, RuntimeError):
    """A communicator's collectives were started or completed out of order.

    For example a second collective started under a tag still in flight, ``complete(tag)``
    for a tag with nothing in flight, or a process set changed while collectives were pending.
    """
