"""Rows with images in the offline trainers: on pairs they are DPOTrainer's vision path; K scored responses per image
prompt in every layout the model's image inputs allow, with the vision encoder run once per prompt where the prompt
is shared. Tiny vision-language models built offline (tests/vlm_helpers.py)."""

import copy

import pytest
import torch
from datasets import Dataset
from helpers import dpo_args, first_batch_loss_and_grads, nca_args
from trl import DPOTrainer
from vlm_helpers import build_vlm, build_vlm_processor, small_images

from trl_nca import InfoNCATrainer, NCATrainer

CASES = [(InfoNCATrainer, "sigmoid"), (NCATrainer, "nca_pair")]
PROMPTS = ["Describe the image.", "What colour is it?", "Is there a cat?", "Name the shapes."]
ANSWERS = ["A red square.", "noise", "The sky is blue.", "green grass", "hello world", "two"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: two threads only contend (several times slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def pair_rows():
    images = small_images(len(PROMPTS), seed=3)
    return Dataset.from_list(
        [
            {
                "images": [image],
                "prompt": user(p),
                "chosen": assistant(ANSWERS[i]),
                "rejected": assistant(ANSWERS[i + 1]),
            }
            for i, (p, image) in enumerate(zip(PROMPTS, images))
        ]
    )


def k_rows(counts=(3, 2, 4)):
    return Dataset.from_list(k_row_list(counts))


def k_row_list(counts):
    images = small_images(len(counts), seed=5)
    return [
        {
            "images": [image],
            "prompt": user(PROMPTS[i]),
            "completions": [assistant(ANSWERS[(i + k) % len(ANSWERS)]) for k in range(n)],
            "rewards": [float((i * 7 + k * 3) % 5) for k in range(n)],
        }
        for i, (n, image) in enumerate(zip(counts, images))
    ]


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("ours_cls, loss_type", CASES)
def test_on_image_pairs_the_loss_and_gradients_are_dpos(ours_cls, loss_type, kind, tmp_path):
    """InfoNCA = DPO (sigmoid) and NCA = nca_pair on DPOTrainer's own vision rows, model and reference."""
    processor = build_vlm_processor(kind)
    policy, reference = build_vlm(processor, kind, seed=0), build_vlm(processor, kind, seed=1)
    data = pair_rows()

    def build(cls, args):
        return cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args, train_dataset=data,
                   processing_class=processor)  # fmt: skip

    dpo = build(DPOTrainer, dpo_args(tmp_path, loss_type=loss_type))
    ours = build(ours_cls, nca_args(tmp_path, prompt_sharing="off"))
    dpo_loss, dpo_grads = first_batch_loss_and_grads(dpo)
    our_loss, our_grads = first_batch_loss_and_grads(ours)
    assert dpo_loss.item() > 0.05
    torch.testing.assert_close(our_loss, dpo_loss, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == dpo_grads.keys()
    vision = [n for n in dpo_grads if n.startswith(("model.visual.", "model.vision_tower."))]
    assert any(dpo_grads[n].abs().sum() > 0 for n in vision)  # the images reach the loss
    for name in dpo_grads:
        torch.testing.assert_close(our_grads[name], dpo_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def encoded_images(trainer, kind, batch):
    """Images the vision tower encodes in one loss computation of the trainer (policy and reference forwards)."""
    counts = []

    def count(module, args, kwargs):
        if kind == "qwen2_vl":
            counts.append(len(kwargs.get("grid_thw", args[1] if len(args) > 1 else None)))
        else:
            counts.append(len(args[0] if args else kwargs["pixel_values"]))

    towers = [
        m.model.visual if kind == "qwen2_vl" else m.model.vision_tower for m in (trainer.model, trainer.ref_model)
    ]
    handles = [tower.register_forward_pre_hook(count, with_kwargs=True) for tower in towers]
    try:
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return loss, sum(counts)


LAYOUTS = [("qwen2_vl", "off"), ("llava", "off"), ("llava", "mask"), ("llava", "cache")]


@pytest.mark.parametrize("kind, prompt_sharing", LAYOUTS)
@pytest.mark.parametrize("cls", [NCATrainer, InfoNCATrainer])
def test_k_scored_responses_per_image_prompt_in_every_layout(cls, kind, prompt_sharing, tmp_path):
    """Each layout gives the padded layout's loss and gradients; the vision encoder runs once per response in the
    padded layout (as DPOTrainer's, twice per pair) and once per prompt where the prompt is shared."""
    processor = build_vlm_processor(kind)
    policy, reference = build_vlm(processor, kind, seed=0), build_vlm(processor, kind, seed=1)
    data = k_rows()

    def build(setting):
        return cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), train_dataset=data,
                   args=nca_args(tmp_path, prompt_sharing=setting), processing_class=processor)  # fmt: skip

    padded, shared = build("off"), build(prompt_sharing)
    rows = [data[i] for i in range(len(data))]
    expected_loss, expected_grads = first_batch_loss_and_grads(padded)
    loss, grads = first_batch_loss_and_grads(shared)
    assert expected_loss.item() > 0.05
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the vision encoder: policy + reference, once per sequence that carries the image
    _, encoded = encoded_images(shared, kind, shared._prepare_inputs(shared.data_collator(rows)))
    assert encoded == 2 * (9 if prompt_sharing == "off" else 3)  # 3 + 2 + 4 responses, 3 prompts


def test_auto_keeps_an_mrope_model_padded_and_an_explicit_shared_layout_is_refused(tmp_path):
    processor = build_vlm_processor("qwen2_vl")
    model = build_vlm(processor, "qwen2_vl")
    trainer = NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=k_rows(), processing_class=processor)
    assert trainer._layout == "padded"
    for setting in ("mask", "cache", "on"):
        with pytest.raises(ValueError, match=r"rows with images: the model computes 3D \(M-RoPE\) positions"):
            NCATrainer(model=build_vlm(processor, "qwen2_vl"), args=nca_args(tmp_path, prompt_sharing=setting),
                       train_dataset=k_rows(), processing_class=processor)  # fmt: skip


def test_auto_shares_the_prompt_of_image_rows_on_a_1d_position_model(tmp_path):
    processor = build_vlm_processor("llava")
    trainer = NCATrainer(model=build_vlm(processor, "llava"), args=nca_args(tmp_path), train_dataset=k_rows(),
                         processing_class=processor)  # fmt: skip
    assert set(trainer._layout) == {"cache", "mask", "padded"}
    trainer.data_collator([k_rows()[i] for i in range(3)])
    assert trainer.data_collator.encoded_images == 3  # the cost model shared the prompt: once per row


def test_image_rows_need_the_processor_and_refuse_what_cannot_carry_images(tokenizer, tmp_path):
    processor = build_vlm_processor("llava")
    model = build_vlm(processor, "llava")
    with pytest.raises(ValueError, match="pass the model's processor .* as `processing_class`, not"):
        NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=k_rows(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="`precompute_ref_log_probs=True` is not supported for rows with images"):
        NCATrainer(model=model, args=nca_args(tmp_path, precompute_ref_log_probs=True), train_dataset=k_rows(),
                   processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="`compute_metrics` with rows with images is not supported"):
        NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=k_rows(), processing_class=processor,
                   compute_metrics=lambda prediction: {})  # fmt: skip
    bad = k_row_list((3, 2, 4))
    bad[1]["rewards"] = [1.0]
    with pytest.raises(ValueError, match="Row 1, columns 'completions' and 'rewards': 2 completions but 1 rewards"):
        NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=Dataset.from_list(bad),
                   processing_class=processor)  # fmt: skip


def test_ranked_lists_and_ranked_columns_with_images_train_as_their_rank_rewards(tmp_path):
    """Every response layout takes images: a ranked list (no rewards) and `A0..` columns give the loss of the same
    rows with the rank rewards 0, -1, -2 written out."""
    processor = build_vlm_processor("llava")
    policy, reference = build_vlm(processor, "llava", seed=0), build_vlm(processor, "llava", seed=1)
    explicit = k_row_list(counts=(3, 3))
    ranked = [{k: v for k, v in row.items() if k != "rewards"} for row in explicit]
    columns = [
        {"images": r["images"], "prompt": r["prompt"], **{f"A{k}": c for k, c in enumerate(r["completions"])}}
        for r in ranked
    ]
    for row in explicit:
        row["rewards"] = [0.0, -1.0, -2.0]
    losses = []
    for rows in (explicit, ranked, columns):
        trainer = NCATrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                             args=nca_args(tmp_path, prompt_sharing="off"), train_dataset=Dataset.from_list(rows),
                             processing_class=processor)  # fmt: skip
        losses.append(first_batch_loss_and_grads(trainer)[0])
    assert losses[0].item() > 0.05
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])
