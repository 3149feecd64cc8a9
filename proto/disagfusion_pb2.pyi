from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorLocation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_LOCATION_UNSPECIFIED: _ClassVar[TensorLocation]
    INLINE: _ClassVar[TensorLocation]
    SHM: _ClassVar[TensorLocation]
    TORCH: _ClassVar[TensorLocation]
    NIXL: _ClassVar[TensorLocation]
TENSOR_LOCATION_UNSPECIFIED: TensorLocation
INLINE: TensorLocation
SHM: TensorLocation
TORCH: TensorLocation
NIXL: TensorLocation

class GenerationParams(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed", "num_images", "num_frames", "fps", "keep_frames")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FRAMES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    num_frames: int
    fps: int
    keep_frames: bool
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., num_frames: _Optional[int] = ..., fps: _Optional[int] = ..., keep_frames: _Optional[bool] = ...) -> None: ...

class TensorMeta(_message.Message):
    __slots__ = ("name", "shape", "dtype", "nbytes", "location", "handle")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    nbytes: int
    location: TensorLocation
    handle: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., nbytes: _Optional[int] = ..., location: _Optional[_Union[TensorLocation, str]] = ..., handle: _Optional[bytes] = ...) -> None: ...

class WorkHeader(_message.Message):
    __slots__ = ("request_id", "pipeline", "model", "params", "tensors", "deadline_unix", "reply_to", "error", "error_code", "source_stage", "slo_deadline_unix")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_STAGE_FIELD_NUMBER: _ClassVar[int]
    SLO_DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pipeline: str
    model: str
    params: GenerationParams
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    deadline_unix: float
    reply_to: str
    error: str
    error_code: int
    source_stage: str
    slo_deadline_unix: float
    def __init__(self, request_id: _Optional[str] = ..., pipeline: _Optional[str] = ..., model: _Optional[str] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., deadline_unix: _Optional[float] = ..., reply_to: _Optional[str] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., source_stage: _Optional[str] = ..., slo_deadline_unix: _Optional[float] = ...) -> None: ...

class WorkChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WorkHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[WorkHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("request_id", "status", "reason", "queue_depth", "in_flight", "retryable")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Ack.Status]
        RECEIVED: _ClassVar[Ack.Status]
        DONE: _ClassVar[Ack.Status]
        REJECTED: _ClassVar[Ack.Status]
        FETCHING: _ClassVar[Ack.Status]
    STATUS_UNSPECIFIED: Ack.Status
    RECEIVED: Ack.Status
    DONE: Ack.Status
    REJECTED: Ack.Status
    FETCHING: Ack.Status
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: Ack.Status
    reason: str
    queue_depth: int
    in_flight: int
    retryable: bool
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[Ack.Status, str]] = ..., reason: _Optional[str] = ..., queue_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., retryable: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("stage", "model", "ready", "draining", "queue_depth", "in_flight", "queue_capacity", "outbox_depth", "service_time_ewma_s", "completed_total", "transports", "transport_endpoints")
    class TransportEndpointsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIME_EWMA_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    model: str
    ready: bool
    draining: bool
    queue_depth: int
    in_flight: int
    queue_capacity: int
    outbox_depth: int
    service_time_ewma_s: float
    completed_total: int
    transports: _containers.RepeatedScalarFieldContainer[str]
    transport_endpoints: _containers.ScalarMap[str, str]
    def __init__(self, stage: _Optional[str] = ..., model: _Optional[str] = ..., ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., queue_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., outbox_depth: _Optional[int] = ..., service_time_ewma_s: _Optional[float] = ..., completed_total: _Optional[int] = ..., transports: _Optional[_Iterable[str]] = ..., transport_endpoints: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("request_id", "stage", "step", "total")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stage: str
    step: int
    total: int
    def __init__(self, request_id: _Optional[str] = ..., stage: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class ProgressReply(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("held",)
    HELD_FIELD_NUMBER: _ClassVar[int]
    held: bool
    def __init__(self, held: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "n", "size", "seed", "num_inference_steps", "guidance_scale", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    n: int
    size: str
    seed: int
    num_inference_steps: int
    guidance_scale: float
    model: str
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., n: _Optional[int] = ..., size: _Optional[str] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "seed")
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    seed: int
    def __init__(self, png: _Optional[bytes] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("request_id", "images", "latency_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    latency_s: float
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., latency_s: _Optional[float] = ...) -> None: ...
