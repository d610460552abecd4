"""The tiny VLMs of `vlm_helpers` are real: their processors expand images to as many tokens as the vision tower
gives features, the models train, and TRL 1.16's own DPOTrainer and GRPOTrainer take them."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from helpers import CPU, assistant, user
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.data_utils import apply_chat_template, prepare_multimodal_messages
from vlm_helpers import IMAGE_PLACEHOLDER, IMAGE_TOKEN, KINDS, build_vlm, build_vlm_processor, small_images

# Image tokens per 32x32 image, derived by hand from the image processors' settings:
# qwen2_vl: resized up to min_pixels = 56*56, 56/14 = 4 patches a side, merged 2x2 -> (4/2) * (4/2) = 4
# llava: resized and cropped to 16x16, 16/4 = 4 patches a side -> 4 * 4 = 16 (CLIP's CLS feature dropped)
IMAGE_TOKENS = {"qwen2_vl": 4, "llava": 16}

QUESTION = "Describe the image."

# Parameters that no loss reaches: LLaVA reads the vision tower's hidden states, not its pooled, post-layernormed
# output
UNUSED = {
    "qwen2_vl": set(),
    "llava": {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine OpenMP threads that wait for each other
    make every matmul ~10x slower (a GRPO step: 5.3 s with 2 threads beside a benchmark, 0.6 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def processor(kind):
    return build_vlm_processor(kind)


def prompt_text(processor, image):
    """The prompt as TRL renders it for a VLM: string contents made typed parts, the image first."""
    messages = prepare_multimodal_messages(user(QUESTION), images=[image])
    return apply_chat_template({"prompt": messages}, processor)["prompt"]


def image_token_counts(processor, kind, input_ids):
    return (input_ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])).sum(dim=1).tolist()


def test_chat_template_renders_the_image_placeholder(processor, kind):
    text = prompt_text(processor, small_images(1)[0])
    placeholder = IMAGE_PLACEHOLDER[kind]
    assert text == f"<|im_start|>user\n{placeholder}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    # One token per special token, before the processor expands the image token
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert image_token_counts(processor, kind, torch.tensor([ids])) == [1]


def test_processor_expands_each_image_to_its_features(processor, kind):
    images = small_images(3)
    text = prompt_text(processor, images[0])
    batch = processor(images=images, text=[text] * 3, padding=True, return_tensors="pt")
    assert image_token_counts(processor, kind, batch["input_ids"]) == [IMAGE_TOKENS[kind]] * 3
    if kind == "qwen2_vl":
        # (time, height, width) patch grid per image; flattened patches of 3 channels x 2 frames x 14 x 14 pixels
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
        assert batch["pixel_values"].shape == (3 * 16, 3 * 2 * 14 * 14)
        assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [IMAGE_TOKENS[kind]] * 3
    else:
        assert batch["pixel_values"].shape == (3, 3, 16, 16) and "image_grid_thw" not in batch


def test_forward_and_backward_use_the_image(processor, kind):
    model = build_vlm(processor, kind)
    images = small_images(2, seed=1)
    text = prompt_text(processor, images[0])
    batch = processor(images=images, text=[text] * 2, padding=True, return_tensors="pt")
    # As many image tokens in each row as the vision tower gives features for its image
    vision_inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    features = model.model.get_image_features(**vision_inputs).pooler_output
    assert (
        [len(f) for f in features]
        == image_token_counts(processor, kind, batch["input_ids"])
        == [IMAGE_TOKENS[kind]] * 2
    )
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    # The image reaches the loss: the vision tower has gradients, and the two rows (same text, different
    # images) have different logits after the image
    tower = [
        p.grad
        for n, p in model.named_parameters()
        if n.startswith(("model.visual.", "model.vision_tower.")) and n not in UNUSED[kind]
    ]
    assert tower and all(g is not None for g in tower) and sum(g.abs().sum() for g in tower) > 0
    assert not torch.allclose(out.logits[0, -1], out.logits[1, -1])
    assert tuple(out.logits.shape) == (2, batch["input_ids"].shape[1], len(processor.tokenizer))


def test_qwen2_vl_positions_are_3d_over_the_image_grid():
    processor = build_vlm_processor("qwen2_vl")
    model = build_vlm(processor, "qwen2_vl")
    batch = processor(images=small_images(1), text=[prompt_text(processor, small_images(1)[0])], return_tensors="pt")
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    image = (batch["mm_token_type_ids"][0] == 1).nonzero().flatten()
    first = image[0].item()  # text before the image: 1D positions 0, 1, ... in all three sections
    assert positions[:, 0, :first].tolist() == [list(range(first))] * 3
    # The 2x2 merged grid: time constant, height [0, 0, 1, 1], width [0, 1, 0, 1], offset by the text before it
    assert (positions[:, 0, image] - first).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 0, 1]]
    # Text after the image resumes one past the grid's largest position
    assert positions[:, 0, image[-1] + 1].tolist() == [first + 2] * 3


def changed_parameters(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_trl_dpo_trainer_trains_one_step(processor, kind, tmp_path):
    model = build_vlm(processor, kind)
    images = small_images(4)
    data = Dataset.from_list(
        [
            {
                "images": [image],
                "prompt": user(QUESTION),
                "chosen": assistant("A red square."),
                "rejected": assistant("noise"),
            }
            for image in images
        ]
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),  # without one, TRL reloads the reference from the model's hub id
        args=DPOConfig(output_dir=str(tmp_path), **{**CPU, "beta": 0.5}),
        train_dataset=data,
        processing_class=processor,
    )
    batch = trainer.data_collator([data[i] for i in range(4)])
    # Prompts of chosen and rejected rows, each with its image's tokens
    assert image_token_counts(processor, kind, batch["input_ids"]) == [IMAGE_TOKENS[kind]] * 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logged = trainer.state.log_history[0]
    # The policy starts equal to the reference: every margin is 0 and the sigmoid loss is log 2
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-6) and logged["rewards/margins"] == 0.0
    assert changed_parameters(model, before) == set(before) - UNUSED[kind]


def test_trl_grpo_trainer_trains_one_step(processor, kind, tmp_path):
    model = build_vlm(processor, kind)
    images = small_images(4, seed=2)
    data = Dataset.from_list([{"prompt": user(QUESTION), "image": image} for image in images])
    seen = []

    def token_sum(completions, completion_ids, image, **kwargs):
        seen.append(image)
        return [float(sum(ids)) for ids in completion_ids]  # distinct completions, distinct rewards

    args = GRPOConfig(output_dir=str(tmp_path), **{**CPU, "num_generations": 2, "max_completion_length": 4})
    trainer = GRPOTrainer(
        model=model, reward_funcs=token_sum, args=args, train_dataset=data, processing_class=processor
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logged = trainer.state.log_history[0]
    # One step: 2 prompts x 2 generations, each reward function call sees the rows' images
    assert len(seen) == 1 and len(seen[0]) == 4 and all(im.size == (32, 32) for im in seen[0])
    assert seen[0][0].tobytes() == seen[0][1].tobytes() and seen[0][0].tobytes() != seen[0][2].tobytes()
    # Every prompt token, the image's expanded tokens included, plus the completions
    prompt = processor(images=images[:1], text=[prompt_text(processor, images[0])])["input_ids"][0]
    assert logged["num_tokens"] == 4 * len(prompt) + 4 * logged["completions/mean_length"]
    assert logged["frac_reward_zero_std"] == 0.0 and math.isfinite(logged["loss"])
    assert changed_parameters(model, before) == set(before) - UNUSED[kind]
