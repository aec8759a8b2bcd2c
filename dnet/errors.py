"""The DnetError tree.

Every error dnet raises on purpose is a ``DnetError``. Each class carries a stable
``code`` (used on the wire and in API errors) so callers never match on messages.
"""

from __future__ import annotations


class DnetError(Exception):
    """Base of every error dnet raises on purpose."""

    code = "dnet_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(DnetError):
    """A model reference names no readable model directory (nor a cached HF repo)."""

    code = "model_not_found"


class UnsupportedArchitecture(DnetError):
    """The model's ``model_type`` is not one the sliced runtime knows how to run."""

    code = "unsupported_architecture"


class InvalidModel(DnetError):
    """The model directory is malformed: bad config, missing or misshaped tensors."""

    code = "invalid_model"


class MissingTensor(InvalidModel):
    code = "missing_tensor"


class TensorShapeMismatch(InvalidModel):
    code = "tensor_shape_mismatch"


class UnsupportedTensorType(InvalidModel):
    """A GGUF tensor of a type dnet cannot load (K-quants, IQ types...)."""

    code = "unsupported_tensor_type"


class OverMemoryBudget(DnetError):
    """A slice needs more memory than the peer offers (``--max-memory``)."""

    code = "over_memory_budget"


class OverDiskBudget(DnetError):
    """A slice's weights do not fit in the disk the peer offers (``--max-disk``),
    even with every model it is not using evicted."""

    code = "over_disk_budget"


class LoadCancelled(DnetError):
    """A load was called off (an unload came) before it finished."""

    code = "load_cancelled"


class LayerRangeError(DnetError):
    """A layer range is empty or outside ``[0, num_layers]``."""

    code = "layer_range"


class InvalidActivation(DnetError):
    """An input to a slice has the wrong kind, shape or dtype."""

    code = "invalid_activation"


class UnknownRequest(DnetError):
    """A request id that this slice does not hold (never started, or already freed)."""

    code = "unknown_request"


class DuplicateRequest(DnetError):
    """A request id that is already in use on this slice."""

    code = "duplicate_request"


class PositionMismatch(DnetError):
    """An input claims a position other than the one its request's cache is at."""

    code = "position_mismatch"


class ContextOverflow(DnetError):
    """A request would grow past its allowed context length."""

    code = "context_overflow"


class InvalidSamplingParams(DnetError):
    """Sampling parameters outside their valid ranges."""

    code = "invalid_sampling_params"


class NotLastSlice(DnetError):
    """Sampling asked of a slice that does not hold the output head."""

    code = "not_last_slice"


class BackendUnsupported(DnetError):
    """The model loads but MLX on this device cannot run it (e.g. an operation the
    CPU backend lacks for this dtype)."""

    code = "backend_unsupported"


class ComputeFailed(DnetError):
    """MLX raised while running a slice."""

    code = "compute_failed"


class PeerUnavailable(DnetError):
    """A peer cannot be reached, or went away while it was needed."""

    code = "peer_unavailable"


class DuplicatePeer(DnetError):
    """Two live peers prove the same peer id (a copied state directory)."""

    code = "duplicate_peer"


class PeerError(DnetError):
    """A peer answered with an error."""

    code = "peer_error"

    def __init__(self, message: str, code: str = "peer_error", peer_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.peer_id = peer_id


class ModelNotLoaded(DnetError):
    """A request needs a model and none is loaded."""

    code = "model_not_loaded"


class OverCapacity(DnetError):
    """More requests at once than the head admits (``--max-concurrent``)."""

    code = "over_capacity"


class InvalidRequest(DnetError):
    """A client request that cannot be served as asked; ``param`` names the field."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code
