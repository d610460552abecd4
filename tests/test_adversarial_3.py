"""The third adversarial run: image batches that lose their images, runs that would train nothing, columns that
clash with the reward call, and errors that did not name the row, the column or the function."""

import copy
import io
from collections import Counter

import pytest
import torch
from datasets import Dataset
from helpers import first_batch_loss_and_grads, nca_args
from online_helpers import length_reward, online_args, prompts_dataset
from test_images import ANSWERS, PROMPTS, assistant, k_row_list, user
from test_prepare_vlfeedback import vlfeedback_rows
from vlm_helpers import build_vlm, build_vlm_processor

from trl_nca import InfoNCATrainer, OnlineNCATrainer
from trl_nca.generation import build_reward_dataset
from trl_nca.scripts.online import reward_specs
from trl_nca.scripts.prepare import vlfeedback_row


@pytest.fixture(scope="module")
def llava():
    processor = build_vlm_processor("llava")
    return processor, build_vlm(processor, "llava", seed=0), build_vlm(processor, "llava", seed=1)


def text_row(i, n=2):
    return {"images": [], "prompt": user(PROMPTS[i]), "rewards": [float(k) for k in range(n)],
            "completions": [assistant(ANSWERS[(i + k) % len(ANSWERS)]) for k in range(n)]}  # fmt: skip


def trainer_of(llava, rows, tmp_path, prompt_sharing="off", **overrides):
    processor, policy, reference = llava
    return InfoNCATrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                          args=nca_args(tmp_path, prompt_sharing=prompt_sharing, **overrides),
                          train_dataset=Dataset.from_list(rows), processing_class=processor)  # fmt: skip


@pytest.mark.parametrize("prompt_sharing", ["off", "mask", "cache"])
@pytest.mark.parametrize("text_first", [True, False], ids=["text-row-first", "image-row-first"])
def test_a_batch_mixing_image_rows_and_text_rows_keeps_every_image(llava, prompt_sharing, text_first, tmp_path):
    """The loss of the mixed batch is the mean of each row's loss alone (before: an image-less first row dropped
    every row's images, an image row first raised KeyError 'pixel_values')."""
    image_rows = k_row_list((3, 2))
    rows = [text_row(2), *image_rows] if text_first else [*image_rows, text_row(2)]
    trainer = trainer_of(llava, rows, tmp_path, prompt_sharing)
    loss, _ = first_batch_loss_and_grads(trainer)
    alone = []
    for row in rows:
        single = trainer_of(llava, [row], tmp_path / "alone", prompt_sharing)
        alone.append(first_batch_loss_and_grads(single)[0])
    torch.testing.assert_close(loss, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)


def test_an_image_prompt_longer_than_max_length_is_refused_naming_the_row(llava, tmp_path):
    """Before: every response truncated away, 2 steps at loss 2 log 2 and grad_norm 0, no word."""
    trainer = trainer_of(llava, k_row_list((2, 2)), tmp_path, max_length=12)
    rows = [trainer.train_dataset[i] for i in range(2)]
    with pytest.raises(ValueError, match=r"Row 0, column 'prompt': with its 1 image\(s\) the prompt is \d+ tokens, "
                                         r"and max_length=12 leaves no token"):  # fmt: skip
        trainer.data_collator(rows)


@pytest.mark.parametrize("prompt_sharing", ["off", "mask", "cache"])
def test_the_image_token_in_a_response_is_refused_in_every_layout(llava, prompt_sharing, tmp_path):
    rows = k_row_list((2, 3))
    rows[1]["completions"][2] = assistant("It shows <image> twice.")
    trainer = trainer_of(llava, rows, tmp_path, prompt_sharing)
    with pytest.raises(ValueError, match=r"Row 1, column 'completions', response 2: it holds the image token"):
        trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


def test_an_image_token_written_in_a_prompt_names_the_row(llava, tmp_path):
    rows = k_row_list((2, 2))
    rows[1]["prompt"] = user("What is this <image> here?")
    trainer = trainer_of(llava, rows, tmp_path)
    with pytest.raises(ValueError, match=r"Row 1, column 'prompt' with its 1 image\(s\): "):
        trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


def test_prepare_vlfeedback_drops_undecodable_image_bytes_naming_the_row():
    drops = Counter()
    row = {**vlfeedback_rows()[0], "image": {"bytes": b"this is no jpeg", "path": None}}
    assert vlfeedback_row(row, 2, drops) is None
    assert drops == {"rows (column 'image': not a readable image (UnidentifiedImageError))": 1}
    good = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(good, format="PNG")
    assert vlfeedback_row({**row, "image": {"bytes": good.getvalue(), "path": None}}, 3, drops) is not None


def test_a_column_that_clashes_with_the_reward_call_is_refused_up_front(tokenizer, tmp_path):
    """A previous round's output (with `completions`) reused as prompts: GRPO would pass `completions` twice."""
    reused = prompts_dataset().add_column("completions", [["a", "b"]] * 4)
    with pytest.raises(ValueError, match=r"The train dataset has a column 'completions', a keyword reward functions"):
        OnlineNCATrainer(model="unused", reward_funcs=length_reward, args=online_args(tmp_path),
                         train_dataset=reused, processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match=r"The prompts dataset has a column 'completions'"):
        build_reward_dataset(None, tokenizer, reused, length_reward, k=2)  # before any model is called


def test_online_image_rows_with_a_row_without_its_image_are_refused_naming_it(tokenizer, tmp_path):
    with_images = Dataset.from_dict({"prompt": [user("a"), user("b"), user("c")],
                                     "images": [[], [[[0, 0, 0]]], [[[0, 0, 0]]]]})  # fmt: skip
    with pytest.raises(ValueError, match=r"row 0, column 'images': no image, where other rows have one"):
        OnlineNCATrainer(model="unused", reward_funcs=length_reward, args=online_args(tmp_path),
                         train_dataset=with_images, processing_class=tokenizer)  # fmt: skip


def test_a_yaml_scalar_reward_spec_is_one_spec():
    assert reward_specs("my_module:my_reward") == ["my_module:my_reward"]
    assert reward_specs(["a:b", "c:d"]) == ["a:b", "c:d"]


def test_python_reward_functions_are_checked_at_construction_and_named_when_they_fail(tokenizer, tmp_path):
    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"Reward function 'no_kwargs' has the signature \(prompts, completions\)"):
        OnlineNCATrainer(model="unused", reward_funcs=no_kwargs, args=online_args(tmp_path),
                         train_dataset=prompts_dataset(), processing_class=tokenizer)  # fmt: skip

    def broken(prompts, completions, **kwargs):
        return [1 / 0 for _ in completions]

    from test_online import build

    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=broken, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match=r"Reward function 'broken' raised ZeroDivisionError: division by zero"):
        trainer.train()


def test_the_output_folder_warning_says_checkpoints_are_overwritten():
    from trl_nca.scripts.utils import earlier_run_warning

    said = earlier_run_warning("out", ["checkpoint-1"])
    assert "checkpoint-N) overwrites the earlier run's" in said and "go beside" not in said
