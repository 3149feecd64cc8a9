"""Wan image-to-video: WanImageToVideoPipeline.

The encoder runs the text encoder and, when the checkpoint has one (Wan2.1
I2V; Wan2.2 A14B I2V has none), the CLIP image encoder on the reference
image. The denoiser loads the transformer(s) and the small VAE, which turns
the reference image into the condition latents inside the pipeline's own
prepare_latents; it never loads a text or image encoder. The reference image
travels as uint8 (H, W, 3) from the gateway through the encoder.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from disagfusion.worker.models.families.base import (
    MAX_REFERENCE_SIDE,
    Family,
    SizeRules,
    TensorSpec,
)
from disagfusion.worker.models.families.wan import WanFamily
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import torch

REFERENCE = "reference_image"
_REFERENCE_SPEC = TensorSpec((None, None, 3), floating=False, itemsize=1)  # uint8 RGB


class WanI2VFamily(WanFamily):
    name = "wan-i2v"
    pipeline_class = "WanImageToVideoPipeline"
    components = {
        "encoder": ("text_encoder", "tokenizer", "image_encoder", "image_processor"),
        "denoiser": ("transformer", "scheduler", "vae"),
        "decoder": ("vae",),
    }
    reference = "required"
    embeddings: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    image_encoder: ClassVar[bool] = True
    # The denoiser takes one reference image per request (not one per output):
    # its inputs cannot be joined along the images.
    batch_roles: ClassVar[frozenset[str]] = frozenset({"encoder", "decoder"})

    def bind(self, components: Collection[str]) -> Family:
        if ("image_encoder" in components) == self.image_encoder:
            return self
        return _WITHOUT_IMAGE_ENCODER

    def embedding_names(self, params: GenerationParams) -> tuple[str, ...]:
        extra = ("image_embeds",) if self.image_encoder else ()
        return (*super().embedding_names(params), *extra, REFERENCE)

    def prepare(self, pipe: Any, role: str, sizes: SizeRules) -> None:
        super().prepare(pipe, role, sizes)
        if role == "denoiser" and self.image_encoder:
            # check_inputs refuses `image` with `image_embeds`, but __call__ needs
            # both when the embeddings come from another stage: the image for the
            # VAE's condition latents, the embeddings for cross-attention.
            check = type(pipe).check_inputs

            def check_inputs(
                prompt: Any, negative_prompt: Any, image: Any, *a: Any, **k: Any
            ) -> Any:
                return check(pipe, prompt, negative_prompt, None, *a, **k)

            pipe.check_inputs = check_inputs

    def encoder_specs(self, params: GenerationParams) -> dict[str, TensorSpec]:
        return {REFERENCE: _REFERENCE_SPEC}

    def encode_inputs(
        self,
        pipe: Any,
        params: GenerationParams,
        device: torch.device,
        inputs: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = self.encode(pipe, params, device)
        if self.image_encoder:
            # One image: the denoiser's __call__ repeats it to the batch.
            out["image_embeds"] = pipe.encode_image(_image(inputs[REFERENCE]), device)
        return {**out, REFERENCE: inputs[REFERENCE].cpu()}

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        specs = {n: s for n, s in super().embedding_specs(pipe, params).items() if n != REFERENCE}
        specs.pop("image_embeds", None)
        if self.image_encoder:
            specs["image_embeds"] = TensorSpec((1, None, pipe.transformer.config.image_dim))
        specs[REFERENCE] = _REFERENCE_SPEC
        return specs

    def max_free_dim(self, tensor: str) -> int:
        return MAX_REFERENCE_SIDE if tensor == REFERENCE else super().max_free_dim(tensor)

    def denoise(
        self,
        pipe: Any,
        params: GenerationParams,
        embeds: Mapping[str, torch.Tensor],
        generator: Any,
    ) -> torch.Tensor:
        tensors = dict(embeds)
        image = _image(tensors.pop(REFERENCE))
        return super().denoise(pipe, params, {**tensors, "image": image}, generator)

    def check_embeddings(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        pair = {n: t for n, t in tensors.items() if n.endswith("prompt_embeds")}
        return super().check_embeddings(pair)

    def monolithic_kwargs(
        self, params: GenerationParams, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {**self.prompt_kwargs(params), "image": _image(inputs[REFERENCE])}


class _WanI2VNoImageEncoder(WanI2VFamily):
    image_encoder = False


_WITHOUT_IMAGE_ENCODER = _WanI2VNoImageEncoder()


def _image(tensor: torch.Tensor) -> Any:
    """The reference image as the PIL image a client would pass the pipeline."""
    from PIL import Image

    return Image.fromarray(tensor.cpu().numpy())


FAMILY = WanI2VFamily()
