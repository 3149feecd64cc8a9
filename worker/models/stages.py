"""One pipeline, split into encoder / denoiser / decoder stages (or run whole).

Each stage loads the same checkpoint with the components it does not need
set to None, and drives the pipeline's own code (encode_prompt, __call__ with
precomputed embeddings and output_type="latent", the post-loop decode), so
the chained stages reproduce the monolithic pipeline bit for bit.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from typing import Any

import torch

from disagfusion.worker.models.builtin import quiet_progress
from disagfusion.worker.models.loading import ModelInfo, describe_model, read_components
from disagfusion.worker.params import ROLES, GenerationParams

# Components each role loads, by name or name prefix (text_encoder_2, tokenizer_3).
# Anything else (safety_checker, feature_extractor, image_encoder) is never
# loaded: no stage runs it, so the monolithic baseline drops it as well.
_ROLE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "encoder": ("text_encoder", "tokenizer"),
    "denoiser": ("unet", "transformer", "scheduler"),
    "decoder": ("vae",),
}
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# The order of encode_prompt's return values (SD: the first two).
_ENCODE_ORDER = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
LATENTS = "latents"
IMAGES = "images"


class StageInputError(ValueError):
    """A request's tensors or parameters do not fit this stage.

    The request fails; the worker carries on.
    """


def uses_cfg(params: GenerationParams) -> bool:
    """Classifier-free guidance, as the pipelines decide it (guidance_scale > 1)."""
    return params.guidance_scale > 1


def embedding_names(family: str, cfg: bool) -> tuple[str, ...]:
    """Tensors the encoder sends to the denoiser."""
    names = ["prompt_embeds"] + (["negative_prompt_embeds"] if cfg else [])
    if family == "mmdit":
        names += ["pooled_prompt_embeds"] + (["negative_pooled_prompt_embeds"] if cfg else [])
    return tuple(names)


def input_names(role: str, family: str, params: GenerationParams) -> tuple[str, ...]:
    if role == "denoiser":
        return embedding_names(family, uses_cfg(params))
    return (LATENTS,) if role == "decoder" else ()


def output_names(role: str, family: str, params: GenerationParams) -> tuple[str, ...]:
    if role == "encoder":
        return embedding_names(family, uses_cfg(params))
    return (LATENTS,) if role == "denoiser" else (IMAGES,)


def resolve_dtype(device: str, dtype: str | None) -> torch.dtype:
    """float32 on CPU, bfloat16 on accelerators, unless asked otherwise."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def stage_components(role: str, components: Mapping[str, object]) -> set[str]:
    """The component names `role` loads out of a pipeline's components."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    roles = _ROLE_COMPONENTS if role == "monolithic" else {role: _ROLE_COMPONENTS[role]}
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
) -> StageModel:
    """Load only `role`'s components of `source` onto `device`."""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    torch_dtype = resolve_dtype(device, dtype)
    info = describe_model(source, cache_dir=cache_dir)
    components = read_components(info.path)
    keep = stage_components(role, components)
    skip: dict[str, Any] = {c: None for c in components if c not in keep}
    if info.pipeline_class == "StableDiffusionPipeline":
        skip["requires_safety_checker"] = False  # we never load the checker
    with quiet_progress():
        pipe = getattr(diffusers, info.pipeline_class).from_pretrained(
            info.path, dtype=torch_dtype, **skip
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.vae is None:
        # The pipelines fall back to 8 when no VAE is loaded; use the real factor.
        pipe.vae_scale_factor = info.vae_scale_factor
        pipe.image_processor = VaeImageProcessor(vae_scale_factor=info.vae_scale_factor)
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
        self._lock = threading.Lock()

    def input_names(self, params: GenerationParams) -> tuple[str, ...]:
        return input_names(self.role, self.info.family, params)

    def output_names(self, params: GenerationParams) -> tuple[str, ...]:
        return output_names(self.role, self.info.family, params)

    def run(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        self._check_params(params)
        expected = self._expected_shapes(params)
        _check_names(inputs, expected)
        tensors = {
            name: _check_tensor(name, inputs[name], shape) for name, shape in expected.items()
        }
        for name, tensor in tensors.items():
            # The pipelines concatenate negative and positive embeddings.
            positive = tensors.get(name.replace("negative_", ""))
            if positive is not None and tensor.shape != positive.shape:
                raise StageInputError(
                    f"input {name} has shape {tuple(tensor.shape)}; expected the shape of "
                    f"{name.replace('negative_', '')} {tuple(positive.shape)}"
                )
        tensors = {name: t.to(self.device, self.dtype) for name, t in tensors.items()}
        with self._lock, torch.inference_mode():
            if self.role == "encoder":
                return self._encode(params)
            if self.role == "denoiser":
                return self._denoise(params, tensors)
            if self.role == "decoder":
                return {IMAGES: self._decode(tensors[LATENTS])}
            return {IMAGES: self._monolithic(params)}

    # --- the four roles ---------------------------------------------------

    def _encode(self, params: GenerationParams) -> dict[str, torch.Tensor]:
        cfg = uses_cfg(params)
        common: dict[str, Any] = {
            "device": self.device,
            "num_images_per_prompt": params.num_images,
            "do_classifier_free_guidance": cfg,
            "negative_prompt": params.negative_prompt or None,
        }
        if self.info.family == "unet":
            embeds = self.pipe.encode_prompt(params.prompt, **common)
        else:
            embeds = self.pipe.encode_prompt(
                prompt=params.prompt, prompt_2=None, prompt_3=None, **common
            )
        # Both return (prompt, negative[, pooled, negative_pooled]); negatives are None without CFG.
        out = dict(zip(_ENCODE_ORDER, embeds, strict=False))
        return {name: out[name] for name in embedding_names(self.info.family, cfg)}

    def _denoise(
        self, params: GenerationParams, embeds: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # Embeddings are already repeated per image, so the pipeline sees a
        # batch of num_images prompts with one image each: same latent shape
        # and the same per-image randn draws as the monolithic call.
        latents = self.pipe(
            **embeds,
            height=params.height,
            width=params.width,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            num_images_per_prompt=1,
            generator=self._generator(params),
            output_type="latent",
            return_dict=False,
        )[0]
        return {LATENTS: latents}

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Exactly the pipelines' post-loop code.
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor
        if self.info.family == "mmdit":
            latents = latents + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return _to_uint8(self.pipe.image_processor.postprocess(image, output_type="np"))

    def _monolithic(self, params: GenerationParams) -> torch.Tensor:
        images = self.pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            height=params.height,
            width=params.width,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            num_images_per_prompt=params.num_images,
            generator=self._generator(params),
            output_type="np",
            return_dict=False,
        )[0]
        return _to_uint8(images)

    def _generator(self, params: GenerationParams) -> torch.Generator | list[torch.Generator]:
        # One generator per image, so image i is exactly what n=1 with seed + i draws.
        seeds = params.image_seeds()
        if len(seeds) == 1:
            return torch.Generator(self.device).manual_seed(seeds[0])
        return [torch.Generator(self.device).manual_seed(s) for s in seeds]

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

    def _expected_shapes(self, params: GenerationParams) -> dict[str, tuple[int | None, ...]]:
        """Input name -> shape, None where any size is fine (sequence length)."""
        n = params.num_images
        if self.role == "decoder":
            scale = self.info.vae_scale_factor
            channels = self.pipe.vae.config.latent_channels
            return {LATENTS: (n, channels, params.height // scale, params.width // scale)}
        if self.role != "denoiser":
            return {}
        dims: dict[str, tuple[int | None, ...]]
        if self.info.family == "unet":
            dims = {"prompt_embeds": (n, None, self.pipe.unet.config.cross_attention_dim)}
        else:
            config = self.pipe.transformer.config
            dims = {
                "prompt_embeds": (n, None, config.joint_attention_dim),
                "pooled_prompt_embeds": (n, config.pooled_projection_dim),
            }
        return {name: dims[name.replace("negative_", "")] for name in self.input_names(params)}


def _check_names(inputs: Mapping[str, object], expected: Mapping[str, object]) -> None:
    missing = [name for name in expected if name not in inputs]
    extra = [name for name in inputs if name not in expected]
    if missing:
        raise StageInputError(f"missing input tensor(s): {', '.join(missing)}")
    if extra:
        raise StageInputError(f"unexpected input tensor(s): {', '.join(extra)}")


def _check_tensor(name: str, tensor: object, shape: tuple[int | None, ...]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise StageInputError(f"input {name} is a {type(tensor).__name__}, not a tensor")
    if not tensor.is_floating_point():
        raise StageInputError(f"input {name} has dtype {tensor.dtype}; expected floating point")
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
