"""Tiny vision-language models, their processors and images, all built offline for tests.

Two kinds, the two ways TRL feeds images to a model:

- `"qwen2_vl"`: `Qwen2VLForConditionalGeneration`. The processor returns `pixel_values` as flattened patches
  `(patches, 3 * 2 * 14 * 14)` with `image_grid_thw` `(images, 3)` and `mm_token_type_ids`; the model computes
  M-RoPE 3D position ids itself from `input_ids`, `image_grid_thw` and `mm_token_type_ids` (no `position_ids` are
  passed). A 32x32 image is resized to 56x56 (the image processor's `min_pixels`), a 4x4 grid of 14-pixel patches
  merged 2x2: 4 `<|image_pad|>` tokens, rendered inside `<|vision_start|>...<|vision_end|>`.
- `"llava"`: `LlavaForConditionalGeneration`, a CLIP vision tower and a Llama text model, plain 1D positions. The
  processor returns `pixel_values` `(images, 3, 16, 16)`: a 4x4 grid of 4-pixel patches, 16 `<image>` tokens (the
  CLS feature is dropped, `vision_feature_select_strategy="default"`).

Both use the PIL image processors (the venv has no torchvision, so the default torchvision-backed classes would fall
back to them with a warning) and a byte-level BPE tokenizer trained on a tiny corpus with the kind's special tokens.
Their chat template is ChatML that renders a `{"type": "image"}` part as the kind's image placeholder, the form
TRL's `prepare_multimodal_messages` gives a prompt with images. Hidden sizes 32, 2 layers, float32.
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import CORPUS, build_tokenizer, tiny_text_config
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

KINDS = ("qwen2_vl", "llava")

# What a {"type": "image"} part renders as, per kind (the processor expands the image token to one per feature)
IMAGE_PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>"}
IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "llava": "<image>"}
_SPECIAL_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>"],
}
_CORPUS = [*CORPUS, "Describe the image. A red square on a blue field. The picture shows noise and colour."] * 2


def _chat_template(image_placeholder: str) -> str:
    """ChatML whose message contents may be strings or lists of typed parts (`image`, `text`)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_placeholder + "{% elif part['type'] == 'text' %}{{ part['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown VLM kind {kind!r}; choose from {KINDS}")


def build_vlm_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """`conftest.build_tokenizer`'s byte-level BPE, trained with the kind's image tokens as special tokens so that
    each stays one token."""
    _check_kind(kind)
    tokenizer = build_tokenizer(_SPECIAL_TOKENS[kind], corpus=_CORPUS)
    tokenizer.chat_template = _chat_template(IMAGE_PLACEHOLDER[kind])
    return tokenizer


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor. That one needs torchvision, which the venv lacks, and
    `ProcessorMixin` type-checks even a `None` video processor (it fails with "type object 'VIDEO_PROCESSOR_MAPPING'
    has no attribute '_extra_content'"). Images, text and chat templates go through `Qwen2VLProcessor` unchanged."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_vlm_processor(kind: str) -> ProcessorMixin:
    """The processor of a tiny VLM of `kind` (see `KINDS`): image processor defaults, a small image size for LLaVA,
    the tokenizer of `build_vlm_tokenizer`, and a chat template that renders image parts as placeholders."""
    tokenizer = build_vlm_tokenizer(kind)
    if kind == "qwen2_vl":
        return ImageOnlyQwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, chat_template=tokenizer.chat_template
        )
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS feature, which the "default" strategy drops again
    )


def _text_config(tokenizer, hidden_size: int) -> dict:
    return tiny_text_config(tokenizer, hidden_size, max_position_embeddings=512, bos_token_id=None)


def build_vlm(processor: ProcessorMixin, kind: str, seed: int = 0, hidden_size: int = 32) -> PreTrainedModel:
    """A randomly initialised float32 VLM of `kind` that matches `processor` (`build_vlm_processor(kind)`)."""
    _check_kind(kind)
    tokenizer = processor.tokenizer
    text = _text_config(tokenizer, hidden_size)
    torch.manual_seed(seed)
    if kind == "qwen2_vl":
        image = processor.image_processor
        head_dim = hidden_size // text["num_attention_heads"]
        quarter = head_dim // 4  # M-RoPE splits the rotary half of each head into (time, height, width) sections
        config = Qwen2VLConfig(
            text_config={
                **text,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [quarter, quarter, head_dim // 2 - 2 * quarter],
                },
            },
            vision_config=dict(
                depth=2,
                embed_dim=hidden_size,
                hidden_size=hidden_size,  # the merger's output: the text model's width
                num_heads=4,
                mlp_ratio=2,
                patch_size=image.patch_size,
                spatial_merge_size=image.merge_size,
                temporal_patch_size=image.temporal_patch_size,
            ),
            image_token_id=processor.image_token_id,
            video_token_id=processor.video_token_id,
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        model = Qwen2VLForConditionalGeneration(config)
    else:
        crop = processor.image_processor.crop_size
        config = LlavaConfig(
            text_config={"model_type": "llama", **text},
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=crop["height"],
                patch_size=processor.patch_size,
            ),
            image_token_id=processor.image_token_id,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            vision_feature_layer=-1,  # the last layer, so that every layer of the tower gets gradients
            tie_word_embeddings=False,
        )
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model.float()


def small_images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """`n` RGB images of `size` x `size` random pixels, different from each other, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
