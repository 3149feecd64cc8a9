"""What every family module describes, and the behaviour most families share.

A family knows one diffusers pipeline class: which components each stage
loads, what the encoder sends the denoiser, how the denoiser drives the
pipeline's own loop to latents, and how the decoder turns latents into
pixels exactly as the pipeline's post-loop code does. The stage code
(`stages.py`), the gateway, the profiler and the launcher only ask.

The describing half (size rules, defaults) reads JSON configs and must stay
torch-free, since the gateway imports it; the running half imports torch
inside its methods.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from disagfusion.worker.params import GenerationParams
from disagfusion.worker.progress import step_callback

if TYPE_CHECKING:
    import numpy as np
    import torch

# Reads `<component>/config.json` of the checkpoint being described.
ConfigReader = Callable[[str], Mapping[str, Any]]
Shape = tuple[int | None, ...]  # None: any size (a sequence length)

# The longest text sequence (tokens) any family's encoder sends: every pipeline
# here truncates to 77 (CLIP), 333 (SD3) or 512 (T5, Qwen2.5-VL, umT5). A receiver
# bounds what it accepts with it, so it may be generous but never short.
MAX_SEQUENCE_TOKENS = 1024
# The largest side (pixels) of an image-to-video reference image the gateway
# forwards; the pipelines resize it to the requested size anyway.
MAX_REFERENCE_SIDE = 4096


@dataclass(frozen=True)
class SizeRules:
    vae_scale_factor: int
    size_multiple: int  # width and height must be multiples of this (pixels)
    default_size: tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class TensorSpec:
    """An input tensor a stage accepts: its shape and whether it is floating point
    (cast to the stage's dtype) or an integer mask (kept as it is)."""

    shape: Shape
    floating: bool = True
    # The widest element a sender uses (bytes), bounding what a receiver accepts:
    # float32 embeddings and latents; int64 masks unless the family knows better.
    itemsize: int = 0

    @property
    def max_itemsize(self) -> int:
        return self.itemsize or (4 if self.floating else 8)


class Family:
    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    # Component names (or name prefixes: text_encoder covers text_encoder_2)
    # each stage loads. Anything else in model_index.json is never loaded.
    components: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "encoder": ("text_encoder", "tokenizer"),
        "denoiser": ("transformer", "scheduler"),
        "decoder": ("vae",),
    }
    # The pipeline's own __call__ defaults: (steps, guidance).
    defaults: ClassVar[tuple[int, float]]
    # Whether a request may carry a negative prompt.
    negative_prompt: ClassVar[bool] = True
    # Embeddings the encoder sends, without and with guidance; negatives are
    # the names prefixed with "negative_".
    embeddings: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    # How __call__ names the per-prompt batch (video pipelines: num_videos_per_prompt).
    per_prompt: ClassVar[str] = "num_images_per_prompt"
    # Video: clips of frame_step*k + 1 frames (0: an image model, one frame),
    # and whether a request carries a reference image (image-to-video).
    frame_step: ClassVar[int] = 0
    default_frames: ClassVar[int] = 1
    default_fps: ClassVar[int] = 16
    reference: ClassVar[str] = "refused"  # or "required"

    # Stages whose requests may share one pipeline call (runtime batching): every
    # input tensor's first dimension is the request's images.
    batch_roles: ClassVar[frozenset[str]] = frozenset({"encoder", "denoiser", "decoder"})

    def bind(self, components: Collection[str]) -> Family:
        """This family for a checkpoint with these components (e.g. with or
        without an image encoder); most families do not depend on them."""
        return self

    # --- described from JSON configs (torch-free) -------------------------

    def size_rules(self, config: ConfigReader) -> SizeRules:
        raise NotImplementedError

    def serving_defaults(self, config: ConfigReader) -> tuple[int, float]:
        return self.defaults

    # --- guidance and tensor names ----------------------------------------

    def uses_cfg(self, params: GenerationParams) -> bool:
        """Classifier-free guidance, as the pipelines decide it (guidance_scale > 1)."""
        return params.guidance_scale > 1

    def embedding_names(self, params: GenerationParams) -> tuple[str, ...]:
        """Tensors the encoder sends to the denoiser for this request."""
        names = list(self.embeddings)
        if self.uses_cfg(params):
            names += ["negative_" + n for n in self.embeddings]
        return tuple(names)

    def check_params(self, params: GenerationParams) -> str | None:
        """A problem with the request this family cannot serve, or None."""
        if params.negative_prompt and not self.negative_prompt:
            return f"{self.name} models take no negative_prompt"
        if self.frame_step == 0 and params.num_frames != 1:
            return f"{self.name} models make images: num_frames must be 1"
        if self.frame_step and (params.num_frames - 1) % self.frame_step:
            return f"num_frames={params.num_frames} must be {self.frame_step}k+1"
        return None

    def call_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """Size (and frame count) arguments of every __call__ of this pipeline."""
        kwargs: dict[str, Any] = {
            "height": params.height,
            "width": params.width,
            "num_inference_steps": params.num_inference_steps,
        }
        if self.frame_step:
            kwargs["num_frames"] = params.num_frames
        return kwargs

    # --- loading -----------------------------------------------------------

    def load_overrides(self) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's from_pretrained."""
        return {}

    def prepare(self, pipe: Any, role: str, sizes: SizeRules) -> None:
        """Fix what loading a subset of the components leaves wrong."""
        if getattr(pipe, "vae", None) is None:
            # The pipelines fall back to 8 when no VAE is loaded; use the real factor.
            pipe.vae_scale_factor = sizes.vae_scale_factor

    # --- the three stages --------------------------------------------------

    def encode(
        self, pipe: Any, params: GenerationParams, device: torch.device
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encoder_specs(self, params: GenerationParams) -> dict[str, TensorSpec]:
        """What the encoder takes from the gateway: nothing but the prompt, except
        for image-to-video (the reference image)."""
        return {}

    def encode_inputs(
        self,
        pipe: Any,
        params: GenerationParams,
        device: torch.device,
        inputs: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        return self.encode(pipe, params, device)

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        """Name -> what the denoiser accepts, for this request."""
        raise NotImplementedError

    def max_free_dim(self, tensor: str) -> int:
        """The largest size a free (None) dimension of input `tensor` can take:
        a token count, unless the family says otherwise."""
        return MAX_SEQUENCE_TOKENS

    def check_embeddings(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """A cross-tensor problem, or None. The pipelines concatenate negative and
        positive embeddings under CFG, so by default their shapes must match."""
        for name, tensor in tensors.items():
            positive = tensors.get(name.replace("negative_", ""))
            if positive is not None and tensor.shape != positive.shape:
                return (
                    f"input {name} has shape {tuple(tensor.shape)}; expected the shape of "
                    f"{name.replace('negative_', '')} {tuple(positive.shape)}"
                )
        return None

    def denoise(
        self,
        pipe: Any,
        params: GenerationParams,
        embeds: Mapping[str, torch.Tensor],
        generator: Any,
    ) -> torch.Tensor:
        # Embeddings are already repeated per image, so the pipeline sees a
        # batch of num_images prompts with one image each: same latent shape
        # and the same per-image randn draws as the monolithic call.
        return pipe(
            **embeds,
            **self.guidance_kwargs(params),
            **self.call_kwargs(params),
            **{self.per_prompt: 1},
            generator=generator,
            callback_on_step_end=step_callback(params.num_inference_steps),
            output_type="latent",
            return_dict=False,
        )[0]

    def batch_key(self, params: GenerationParams) -> tuple[Any, ...]:
        """What else must be equal for requests to share a denoiser or decoder call."""
        return ()

    def encode_many(
        self,
        pipe: Any,
        params: list[GenerationParams],
        device: torch.device,
        inputs: list[Mapping[str, torch.Tensor]],
    ) -> list[dict[str, torch.Tensor]]:
        """The encoder's outputs for several requests (one call where the family
        can join the prompts; one by one otherwise)."""
        return [self.encode_inputs(pipe, p, device, t) for p, t in zip(params, inputs, strict=True)]

    def guidance_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """How the request's guidance_scale reaches the pipeline's __call__."""
        return {"guidance_scale": params.guidance_scale}

    def latent_shape(self, pipe: Any, sizes: SizeRules, params: GenerationParams) -> Shape:
        """The latents the denoiser sends the decoder."""
        scale = sizes.vae_scale_factor
        channels = pipe.vae.config.latent_channels
        return (params.num_images, channels, params.height // scale, params.width // scale)

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        """Latents -> float images in [0, 1], (n, H, W, 3), as the pipeline's post-loop code."""
        raise NotImplementedError

    def monolithic_kwargs(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The input arguments of a one-call pipeline run: the prompt arguments,
        and what the gateway sent the first stage (a reference image)."""
        return self.prompt_kwargs(params)

    def prompt_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """The prompt arguments of a one-call (monolithic) pipeline run."""
        return {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt or None,
            **self.guidance_kwargs(params),
        }


def vae_scale(config: ConfigReader) -> int:
    """The pipelines' own formula for AutoencoderKL: one halving per block but the last."""
    return 2 ** (len(config("vae").get("block_out_channels", [0] * 4)) - 1)


def sample_size(net: Mapping[str, Any], default: int) -> tuple[int, int]:
    """(width, height) of a denoiser config's sample_size, in latents."""
    sample = net.get("sample_size", default)
    return (sample, sample) if isinstance(sample, int) else (int(sample[1]), int(sample[0]))


def encode_order(names: tuple[str, ...], values: Any) -> dict[str, Any]:
    """encode_prompt's positional results by name."""
    return dict(zip(names, values, strict=False))
