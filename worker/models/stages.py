"""One pipeline, split into encoder / denoiser / decoder stages (or run whole).

Each stage loads the same checkpoint with the components it does not need
set to None, and drives the pipeline's own code (encode_prompt, __call__ with
precomputed embeddings and output_type="latent", the post-loop decode), so
the chained stages reproduce the monolithic pipeline bit for bit.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from disagfusion.worker.models.builtin import quiet_progress
from disagfusion.worker.models.families import Family, TensorSpec
from disagfusion.worker.models.loading import ModelInfo, describe_model, read_components
from disagfusion.worker.params import ROLES, GenerationParams
from disagfusion.worker.progress import RequestCancelled

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
LATENTS = "latents"
IMAGES = "images"


class StageInputError(ValueError):
    """A request's tensors or parameters do not fit this stage.

    The request fails; the worker carries on.
    """


def input_names(role: str, family: Family, params: GenerationParams) -> tuple[str, ...]:
    if role in ("encoder", "monolithic"):
        return tuple(family.encoder_specs(params))
    if role == "denoiser":
        return family.embedding_names(params)
    return (LATENTS,) if role == "decoder" else ()


def output_names(role: str, family: Family, params: GenerationParams) -> tuple[str, ...]:
    if role == "encoder":
        return family.embedding_names(params)
    return (LATENTS,) if role == "denoiser" else (IMAGES,)


def resolve_dtype(device: str, dtype: str | None) -> torch.dtype:
    """float32 on CPU, bfloat16 on accelerators, unless asked otherwise."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def stage_components(role: str, family: Family, components: Mapping[str, object]) -> set[str]:
    """The component names `role` loads out of a pipeline's components."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    groups = family.components
    roles = groups if role == "monolithic" else {role: groups[role]}
    prefixes = tuple(p for group in roles.values() for p in group)
    return {
        c for c in components if c in prefixes or c.startswith(tuple(p + "_" for p in prefixes))
    }


def load_stage(
    role: str,
    source: str,
    device: str = "cpu",
    dtype: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    family: str | None = None,
) -> StageModel:
    """Load only `role`'s components of `source` onto `device`.

    `family` (None or "auto": read model_index.json) is checked against the model.
    """
    import diffusers

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    torch_dtype = resolve_dtype(device, dtype)
    info = describe_model(source, cache_dir=cache_dir, family=family)
    spec = info.family_spec
    components = read_components(info.path)
    keep = stage_components(role, spec, components)
    # Components a stage does not run are never read from disk.
    skip: dict[str, Any] = {c: None for c in components if c not in keep}
    with quiet_progress():
        pipe = getattr(diffusers, info.pipeline_class).from_pretrained(
            info.path, dtype=torch_dtype, **skip, **spec.load_overrides()
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    spec.prepare(pipe, role, info.sizes)
    return StageModel(role, info, pipe, torch.device(device), torch_dtype)


class StageModel:
    """A loaded stage: `run(params, inputs)` maps named tensors to named tensors.

    Outputs stay on the stage's device (images: uint8 on CPU); moving them is
    the transport's job. Runs are serialised: a pipeline keeps per-call state.
    """

    def __init__(
        self, role: str, info: ModelInfo, pipe: Any, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.role = role
        self.info = info
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.family = info.family_spec
        self._lock = threading.Lock()

    def input_names(self, params: GenerationParams) -> tuple[str, ...]:
        return input_names(self.role, self.family, params)

    def output_names(self, params: GenerationParams) -> tuple[str, ...]:
        return output_names(self.role, self.family, params)

    def latent_shape(self, params: GenerationParams) -> tuple[int | None, ...]:
        """The latents this model's denoiser sends its decoder for `params`."""
        return self.family.latent_shape(self.pipe, self.info.sizes, params)

    def run(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self._compute(params, self._prepare(params, inputs))

    def max_input_bytes(self, max_images: int) -> int:
        """The most tensor bytes one request's inputs can take: those of the
        largest request this model serves (its largest size and clip, up to
        `max_images` images, with guidance), free dimensions at the family's
        bound, elements at their widest. A receiver refuses a payload
        declaring more before allocating anything."""
        largest = self.largest_request(max_images)
        return max(
            sum(self._spec_bytes(name, spec) for name, spec in self._expected_inputs(p).items())
            for p in (largest, replace(largest, guidance_scale=1.0, negative_prompt=""))
        )

    def largest_request(self, max_images: int, prompt: str = "") -> GenerationParams:
        """The request with the largest inputs this model serves: its largest square
        size and clip length, `max_images` images, guidance on (with a negative
        prompt where the family takes one)."""
        info = self.info
        side = info.max_size - info.max_size % info.size_multiple
        frames = info.max_frames
        if info.frame_step:
            frames = 1 + (frames - 1) // info.frame_step * info.frame_step
        return GenerationParams(
            prompt=prompt,
            negative_prompt=(prompt or "-") if self.family.negative_prompt else "",
            width=side,
            height=side,
            num_images=max_images,
            num_frames=frames,
            guidance_scale=7.5,
        )

    def _spec_bytes(self, name: str, spec: TensorSpec) -> int:
        dims = (self.family.max_free_dim(name) if d is None else d for d in spec.shape)
        return math.prod(dims) * spec.max_itemsize

    # --- batching ---------------------------------------------------------

    def default_max_batch(self) -> int:
        """Requests one call may take when the worker is not told: images batch
        (measured 2.1-2.5x at batch 4 for a tiny UNet at 64x64 on CPU; SGLang 1.8x
        at 2 and 3.2x at 16 on an H200 at 512², so more on an accelerator), video
        clips are too large to hold several."""
        if self.role == "monolithic" or self.role not in self.family.batch_roles:
            return 1
        if self.info.is_video and self.role != "encoder":
            return 1
        return 4 if self.device.type == "cpu" else 8

    def batch_key(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> Hashable | None:
        """Requests with equal keys can share one pipeline call; None: never batched.

        Everything one call takes once must be equal (size, frames, steps,
        guidance, what the family adds); tensors are joined along their first
        dimension, which must be the request's images, with equal trailing shapes."""
        if self.role == "monolithic" or self.role not in self.family.batch_roles:
            return None
        tensors = []
        for name, tensor in sorted(inputs.items()):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
                return None
            if tensor.shape[0] != params.num_images:
                return None
            tensors.append((name, tuple(tensor.shape[1:]), str(tensor.dtype)))
        if self.role == "encoder":
            return ("encoder", self.family.uses_cfg(params), tuple(tensors))
        return (
            self.role,
            params.width,
            params.height,
            params.num_frames,
            params.num_inference_steps if self.role == "denoiser" else 0,
            params.guidance_scale if self.role == "denoiser" else 0.0,
            self.family.uses_cfg(params),
            tuple(tensors),
            self.family.batch_key(params),
        )

    def run_batch(
        self, requests: Sequence[tuple[GenerationParams, Mapping[str, torch.Tensor]]]
    ) -> list[dict[str, torch.Tensor] | Exception]:
        """One result or exception per request, in order.

        A request that fails validation fails alone; requests with equal batch
        keys run as one pipeline call, and a call that fails is retried one by
        one so only the request at fault fails."""
        outcomes: list[dict[str, torch.Tensor] | Exception | None] = [None] * len(requests)
        groups: dict[Hashable, list[tuple[int, GenerationParams, dict[str, torch.Tensor]]]] = {}
        for i, (params, inputs) in enumerate(requests):
            try:
                tensors = self._prepare(params, inputs)
            except StageInputError as err:
                outcomes[i] = err
                continue
            key = self.batch_key(params, inputs)
            groups.setdefault(("alone", i) if key is None else key, []).append((i, params, tensors))
        for group in groups.values():
            if len(group) > 1:
                try:
                    results = self._compute_group([(p, t) for _, p, t in group])
                except RequestCancelled as err:
                    for i, _, _ in group:
                        outcomes[i] = err
                    continue
                except Exception as err:
                    log.warning("a batch of %d failed (%s); running it one by one", len(group), err)
                else:
                    for (i, _, _), result in zip(group, results, strict=True):
                        outcomes[i] = result
                    continue
            for i, params, tensors in group:
                try:
                    outcomes[i] = self._compute(params, tensors)
                except Exception as err:
                    outcomes[i] = err
        return [o if o is not None else RuntimeError("not run") for o in outcomes]

    def _compute_group(
        self, group: Sequence[tuple[GenerationParams, dict[str, torch.Tensor]]]
    ) -> list[dict[str, torch.Tensor]]:
        """One pipeline call for requests of one batch key, split back per request."""
        counts = [p.num_images for p, _ in group]
        merged = replace(group[0][0], num_images=sum(counts))
        with self._lock, torch.inference_mode():
            if self.role == "encoder":
                return self.family.encode_many(
                    self.pipe, [p for p, _ in group], self.device, [t for _, t in group]
                )
            joined = {name: torch.cat([t[name] for _, t in group]) for name in group[0][1]}
            if self.role == "denoiser":
                # Each image keeps its own generator: the same noise as alone.
                generators = [g for p, _ in group for g in self._generators(p)]
                latents = self.family.denoise(self.pipe, merged, joined, generators)
                return [{LATENTS: part.clone()} for part in torch.split(latents, counts)]
            images = self.family.decode(self.pipe, self.info.sizes, merged, joined[LATENTS])
            bounds = list(itertools.accumulate(counts, initial=0))
            return [{IMAGES: _to_uint8(images[lo:hi])} for lo, hi in itertools.pairwise(bounds)]

    # --- one request ------------------------------------------------------

    def _prepare(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The request's tensors checked and on the stage's device; StageInputError if not."""
        self._check_params(params)
        expected = self._expected_inputs(params)
        _check_names(inputs, expected)
        tensors = {name: _check_tensor(name, inputs[name], spec) for name, spec in expected.items()}
        problem = self.family.check_embeddings(tensors) if self.role == "denoiser" else None
        if problem is not None:
            raise StageInputError(problem)
        return {
            name: t.to(self.device, self.dtype if expected[name].floating else t.dtype)
            for name, t in tensors.items()
        }

    def _compute(
        self, params: GenerationParams, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        with self._lock, torch.inference_mode():
            if self.role == "encoder":
                return self.family.encode_inputs(self.pipe, params, self.device, tensors)
            if self.role == "denoiser":
                latents = self.family.denoise(self.pipe, params, tensors, self._generator(params))
                return {LATENTS: latents}
            if self.role == "decoder":
                images = self.family.decode(self.pipe, self.info.sizes, params, tensors[LATENTS])
                return {IMAGES: _to_uint8(images)}
            return {IMAGES: self._monolithic(params, tensors)}

    def _monolithic(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        images = self.pipe(
            **self.family.monolithic_kwargs(params, inputs),
            **self.family.call_kwargs(params),
            **{self.family.per_prompt: params.num_images},
            generator=self._generator(params),
            output_type="np",
            return_dict=False,
        )[0]
        return _to_uint8(images)

    def _generator(self, params: GenerationParams) -> torch.Generator | list[torch.Generator]:
        generators = self._generators(params)
        return generators[0] if len(generators) == 1 else generators

    def _generators(self, params: GenerationParams) -> list[torch.Generator]:
        # One generator per image, so image i is exactly what n=1 with seed + i draws.
        return [torch.Generator(self.device).manual_seed(s) for s in params.image_seeds()]

    # --- validation -------------------------------------------------------

    def _check_params(self, params: GenerationParams) -> None:
        info = self.info
        for field in ("width", "height"):
            value = getattr(params, field)
            if not isinstance(value, int) or not 0 < value <= info.max_size:
                raise StageInputError(f"{field}={value!r} must be in 1..{info.max_size}")
            if value % info.size_multiple:
                raise StageInputError(f"{field}={value} must be a multiple of {info.size_multiple}")
        if not isinstance(params.num_images, int) or params.num_images < 1:
            raise StageInputError(f"num_images={params.num_images!r} must be >= 1")
        if not isinstance(params.num_inference_steps, int) or params.num_inference_steps < 1:
            raise StageInputError(
                f"num_inference_steps={params.num_inference_steps!r} must be >= 1"
            )
        if not math.isfinite(params.guidance_scale):
            raise StageInputError(f"guidance_scale={params.guidance_scale!r} must be finite")
        if not isinstance(params.seed, int) or not 0 <= params.seed < 2**64:
            raise StageInputError(f"seed={params.seed!r} must be in 0..2**64-1")
        if not isinstance(params.prompt, str) or not isinstance(params.negative_prompt, str):
            raise StageInputError("prompt and negative_prompt must be strings")
        if not isinstance(params.num_frames, int) or params.num_frames < 1:
            raise StageInputError(f"num_frames={params.num_frames!r} must be >= 1")
        problem = self.family.check_params(params)
        if problem is not None:
            raise StageInputError(problem)
        if params.num_frames > info.max_frames:
            raise StageInputError(f"num_frames={params.num_frames} must be <= {info.max_frames}")

    def _expected_inputs(self, params: GenerationParams) -> dict[str, TensorSpec]:
        """Input name -> what this stage accepts for the request."""
        if self.role == "decoder":
            return {LATENTS: TensorSpec(self.latent_shape(params))}
        if self.role in ("encoder", "monolithic"):
            return self.family.encoder_specs(params)
        if self.role != "denoiser":
            return {}
        return self.family.embedding_specs(self.pipe, params)


def _check_names(inputs: Mapping[str, object], expected: Mapping[str, object]) -> None:
    missing = [name for name in expected if name not in inputs]
    extra = [name for name in inputs if name not in expected]
    if missing:
        raise StageInputError(f"missing input tensor(s): {', '.join(missing)}")
    if extra:
        raise StageInputError(f"unexpected input tensor(s): {', '.join(extra)}")


def _check_tensor(name: str, tensor: object, spec: TensorSpec) -> torch.Tensor:
    shape = spec.shape
    if not isinstance(tensor, torch.Tensor):
        raise StageInputError(f"input {name} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_floating_point() != spec.floating or tensor.is_complex():
        kind = "floating point" if spec.floating else "an integer or bool mask"
        raise StageInputError(f"input {name} has dtype {tensor.dtype}; expected {kind}")
    got = tuple(tensor.shape)
    if len(got) != len(shape) or any(
        e is not None and e != g for e, g in zip(shape, got, strict=True)
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise StageInputError(f"input {name} has shape {got}; expected {want}")
    return tensor


def _to_uint8(images: Any) -> torch.Tensor:
    # Same rounding as diffusers' numpy_to_pil, so PNGs match the pipeline's PIL output.
    return torch.from_numpy((images * 255).round().astype("uint8"))
