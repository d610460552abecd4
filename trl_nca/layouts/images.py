"""Rows with images: the processor step in front of any text layout, and the image inputs each layout passes on.

A row holds a conversational `prompt`, K `completions`, `rewards` and its `images` (or one `image`), as DPOTrainer's
vision rows do with chosen and rejected. Images are processed on the fly, as `DataCollatorForVisionPreference` does
(processing them up front would store every image's pixel values): the prompt is rendered with the images' parts
(TRL's `prepare_multimodal_messages`), each response is rendered after it (TRL's `apply_chat_template`, which splits
prompt and completion text), the prompt is processed with its images (the placeholder expands to one token per
image feature) and each response is tokenized alone. The rows, now token ids, go to the text layout's collator, and
the image inputs are attached per sequence of that layout:

- `padded`: one sequence per response, so each row's image inputs are repeated K_i times: the vision encoder runs
  sum(K_i) times per batch, as in DPOTrainer (twice per row there).
- `mask`: one sequence per row: the image inputs once per row, the vision encoder once per prompt.
- `cache`: the prompt runs once with its image inputs (`prompt_images`, one dict per row), the responses on its keys
  and values without them: the vision encoder once per prompt.

Models whose positions depend on the images (M-RoPE: Qwen2-VL and its successors compute 3D positions from the
whole sequence) take only the padded layout: the shared layouts give positions of their own. `images_blocker` says
which layouts a model's image inputs rule out, and why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.data_utils import apply_chat_template, prepare_multimodal_messages

# Fields of a processor's output that are per token (they follow `input_ids`): rebuilt for each layout's sequences
PER_TOKEN_FIELDS = ("mm_token_type_ids", "token_type_ids")
# Fields of a processor's output that are per image (or per patch), passed to the model as they are
IMAGE_FIELDS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "image_sizes",
    "spatial_shapes",
    "image_position_ids",
)


def has_images(column_names) -> bool:
    return bool({"image", "images"} & set(column_names))


def images_blocker(model) -> dict[str, str]:
    """The layouts a vision-language model cannot take image rows in, and why (empty: every layout can)."""
    config = model.config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "mrope_section" in rope or getattr(model.config, "vision_start_token_id", None) is not None:
        why = (
            "the model computes 3D (M-RoPE) positions from the whole sequence and its images, where this layout "
            "gives positions of its own"
        )
        return {"mask": why, "cache": why}
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "token_type_ids" in inspect.signature(type(backbone).forward).parameters:
        # Gemma 3 marks image tokens with `token_type_ids`: an image's tokens attend to each other both ways
        return {
            "mask": "the model's image tokens attend to each other both ways (`token_type_ids`), where this layout's "
            "mask is causal",
            "cache": "the model marks its image tokens with per-token `token_type_ids`, which this layout's prompt "
            "forward is not given",
        }
    return {}


def row_images(example: dict) -> list:
    images = example.get("images")
    if images is None and example.get("image") is not None:
        images = [example["image"]]
    return list(images or [])


@dataclass
class DataCollatorForImageRows(DataCollatorMixin):
    """Process image rows (see the module docstring), build the batch with the text collator of the layout `chooser`
    picks for its token ids (or the only one of `collators`), and attach the image inputs for its sequences.

    `encoded_images` counts the images the batches carry to the vision encoder (a row's images once per sequence in
    the padded layout, once per row in the others).
    """

    processor: Any
    collators: dict
    chooser: Any = None  # a DataCollatorForAnyLayout, whose `choose` picks the layout of each batch
    return_tensors: str = "pt"

    def __post_init__(self):
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        token = getattr(self.processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(token) if token else None
        self.encoded_images = 0

    def max_length(self) -> int | None:
        return next(iter(self.collators.values())).max_length

    def tokenize(self, example: dict, row: int) -> tuple[dict, dict]:
        """`(token ids of the row for the text collator, the processor's image inputs of the row)`."""
        images = row_images(example)
        prompt = example["prompt"]
        if not isinstance(prompt, list):
            raise ValueError(
                f"Row {row}, column 'prompt': a row with images needs a conversational prompt (a list of messages), "
                "where the images' parts go; got text."
            )
        prompt = prepare_multimodal_messages(prompt, images=images)
        texts = [
            apply_chat_template({"prompt": prompt, "completion": completion}, self.processor)
            for completion in example["completions"]
        ]
        try:
            processed = self.processor(
                images=images or None, text=[texts[0]["prompt"]], add_special_tokens=False, return_tensors="pt"
            )
        except (ValueError, TypeError, OSError) as error:  # e.g. image tokens and images that do not match
            raise ValueError(f"Row {row}, column 'prompt' with its {len(images)} image(s): {error}") from error
        completion_ids = [self.tokenizer(text["completion"], add_special_tokens=False)["input_ids"] for text in texts]
        for k, ids in enumerate(completion_ids):
            if self.image_token_id is not None and self.image_token_id in ids:
                raise ValueError(
                    f"Row {row}, column 'completions', response {k}: it holds the image token "
                    f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}; images go in the prompt, "
                    "responses are text."
                )
        prompt_length, budget = processed["input_ids"].size(1), self.max_length()
        if budget is not None and prompt_length >= budget:
            raise ValueError(
                f"Row {row}, column 'prompt': with its {len(images)} image(s) the prompt is {prompt_length} tokens, "
                f"and max_length={budget} leaves no token of any response to train on. Raise max_length (or make "
                "the images smaller)."
            )
        tokens = {"prompt_ids": processed["input_ids"][0].tolist(), "completion_ids": completion_ids}
        tokens.update({key: example[key] for key in ("rewards", "ordered", "ref_logps") if key in example})
        inputs = {key: processed[key] for key in IMAGE_FIELDS if key in processed}
        per_token = [key for key in PER_TOKEN_FIELDS if key in processed]
        return tokens, {"inputs": inputs, "per_token": per_token, "images": len(images)}

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self.tokenize(example, row) for row, example in enumerate(examples)]
        tokens = [row for row, _ in rows]
        layout = self.chooser.choose(tokens) if self.chooser is not None else next(iter(self.collators))
        batch = self.collators[layout](tokens)
        images = [image for _, image in rows]
        if layout == "cache":
            if any(image["per_token"] for image in images):
                raise ValueError(
                    f"The prompt-cache layout cannot pass this processor's per-token inputs {images[0]['per_token']} "
                    "to its prompt forward; use prompt_sharing='off' or 'mask'."
                )
            batch["prompt_images"] = [image["inputs"] for image in images]
            self.encoded_images += sum(image["images"] for image in images)
            return batch
        copies = [len(row["completion_ids"]) if layout == "padded" else 1 for row in tokens]
        # Rows without images carry no image inputs: a key any row of the batch has is passed for the rows that have
        # it (the model matches image features to image tokens in order), whichever row comes first
        for key in IMAGE_FIELDS:
            given = [(image["inputs"][key], n) for image, n in zip(images, copies) if key in image["inputs"]]
            if given:
                batch[key] = torch.cat([value for value, n in given for _ in range(n)])
        for key in dict.fromkeys(key for image in images for key in image["per_token"]):
            batch[key] = (batch["input_ids"] == self.image_token_id).long()
        self.encoded_images += sum(image["images"] * n for image, n in zip(images, copies))
        return batch
