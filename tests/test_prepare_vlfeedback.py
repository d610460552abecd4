"""`trl-nca prepare vlfeedback` on small hand-made datasets in VLFeedback's shape (MMInstruction/VLFeedback)."""

import io
import json
from collections import Counter

import pytest
from datasets import Dataset, Features, Image, Sequence, Value, load_from_disk
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from vlm_helpers import build_vlm_processor, small_images

from trl_nca import cli
from trl_nca.scripts.prepare import prepare_vlfeedback, vlfeedback_reward, vlfeedback_row

_RATING = {"Rating": Value("string"), "Rationale": Value("string")}
# The hub's features (its README): `completions` is a Sequence of structs, so `datasets` reads it as a dict of lists
HUB_FEATURES = Features(
    {
        "id": Value("string"),
        "prompt": Value("string"),
        "models": Sequence(Value("string")),
        "completions": Sequence(
            {
                "annotations": {
                    "Helpfulness": _RATING,
                    "Ethical Considerations": _RATING,
                    "Visual Faithfulness": _RATING,
                },
                "model": Value("string"),
                "response": Value("string"),
            }
        ),
        "image": Image(),
    }
)


def completion(response, helpfulness, faithfulness, ethics):
    """One rated response; a rating of None leaves the aspect out."""
    ratings = {"Helpfulness": helpfulness, "Visual Faithfulness": faithfulness, "Ethical Considerations": ethics}
    annotations = {aspect: {"Rating": r, "Rationale": "..."} for aspect, r in ratings.items() if r is not None}
    return {"annotations": annotations, "model": f"model-{response}", "response": response}


def vlfeedback_rows():
    return [
        {  # kept by every aggregation except `faithfulness`, which drops r3 ("N/A")
            "id": "0",
            "prompt": "What is in the picture?",
            "completions": [
                completion("r0", "5", "4", "5"),
                completion("r1", "3", "3", "5"),
                completion("r2", "1", "2", "N/A"),
                completion("r3", "4", "N/A", "N/A"),
            ],
        },
        {  # one response has no numeric rating at all: 1 scored response left, the row is dropped
            "id": "1",
            "prompt": "Describe the image.",
            "completions": [completion("s0", "4", "4", "5"), completion("s1", "N/A", "N/A", "N/A")],
        },
        {  # an empty prompt: dropped
            "id": "2",
            "prompt": "  ",
            "completions": [completion("t0", "4", "4", "5"), completion("t1", "2", "2", "5")],
        },
        {  # Helpfulness missing from u1's annotations
            "id": "3",
            "prompt": "How many squares?",
            "completions": [
                completion("u0", "2", "5", "5"),
                completion("u1", None, "1", "4"),
                completion("u2", "3", "3", "3"),
            ],
        },
    ]


def hub_dataset(rows, images):
    columnar = [
        {
            **row,
            "models": [c["model"] for c in row["completions"]],
            "completions": {key: [c[key] for c in row["completions"]] for key in ("annotations", "model", "response")},
            "image": image,
        }
        for row, image in zip(rows, images)
    ]
    return Dataset.from_list(columnar, features=HUB_FEATURES)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "aggregation, rewards_0, rewards_3",
    [
        ("mean", [14 / 3, 11 / 3, 1.5, 4.0], [4.0, 2.5, 3.0]),
        ("min", [4.0, 3.0, 1.0, 4.0], [2.0, 1.0, 3.0]),
        ("helpfulness", [5.0, 3.0, 1.0, 4.0], [2.0, 3.0]),
        ("faithfulness", [4.0, 3.0, 2.0], [5.0, 1.0, 3.0]),
    ],
)
def test_each_aggregation_on_rows_in_the_hubs_shape(tmp_path, aggregation, rewards_0, rewards_3):
    images = small_images(4)
    hub_dataset(vlfeedback_rows(), images).save_to_disk(str(tmp_path / "hub"))
    prepared, drops = prepare_vlfeedback(str(tmp_path / "hub"), str(tmp_path / "out"), aggregation=aggregation)
    train = load_from_disk(str(tmp_path / "out"))["train"]
    assert train["rewards"] == [rewards_0, rewards_3]
    no_rating = "completions (column 'completions[N].annotations': no aspect has a numeric rating)"
    not_numeric = "completions (column 'completions[N].annotations.{}.Rating': expected a numeric rating)"
    expected = {
        "mean": {no_rating: 1},
        "min": {no_rating: 1},
        "helpfulness": {not_numeric.format("Helpfulness"): 2},
        "faithfulness": {not_numeric.format("Visual Faithfulness"): 2},
    }[aggregation]
    assert drops == Counter(
        {
            **expected,
            "rows with fewer than 2 scored responses": 1,
            "rows (column 'prompt': expected the prompt text)": 1,
        }
    )
    row = train[0]
    responses = {"faithfulness": ["r0", "r1", "r2"]}.get(aggregation, ["r0", "r1", "r2", "r3"])
    assert row["completions"] == [[{"role": "assistant", "content": r}] for r in responses]
    # The image first in the user turn, then the text; the one image in `images`, pixel for pixel
    assert row["prompt"] == [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is in the picture?"}],
        }
    ]
    assert len(row["images"]) == 1 and row["images"][0].tobytes() == images[0].tobytes()
    assert train[1]["images"][0].tobytes() == images[3].tobytes() and row["ordered"] is False


def test_command_on_jsonl_with_image_files_reports_drops(tmp_path, capsys):
    """The hub's raw layout: `vlfeedback_80k.jsonl` and `merged_images/<id>.jpg`, found with --image_dir."""
    images = tmp_path / "merged_images"
    images.mkdir()
    files = {}
    for row, image in zip(vlfeedback_rows(), small_images(4, seed=3)):
        if row["id"] != "3":  # row 3's image is missing
            image.save(images / f"{row['id']}.jpg")
            files[row["id"]] = (images / f"{row['id']}.jpg").read_bytes()
    source = tmp_path / "vlfeedback.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in vlfeedback_rows()))
    argv = ["prepare", "vlfeedback", str(source), "--output_dir", str(tmp_path / "out"), "--image_dir", str(images)]
    assert cli.main([*argv, "--vlfeedback_aggregation", "min"]) == 0
    train = load_from_disk(str(tmp_path / "out"))["train"]
    assert train["rewards"] == [[4.0, 3.0, 1.0, 4.0]]
    # The JPEG file's bytes are stored as they were, not re-encoded
    assert train.cast_column("images", Sequence(Image(decode=False)))[0]["images"][0]["bytes"] == files["0"]
    printed = capsys.readouterr().out
    assert "Wrote " in printed and "train: 1 rows; responses per row: {4: 1}" in printed
    assert "dropped 1 completions (column 'completions[N].annotations': no aspect has a numeric rating)" in printed
    assert "dropped 1 rows with fewer than 2 scored responses" in printed
    assert "dropped 1 rows (column 'prompt': expected the prompt text)" in printed
    assert "dropped 1 rows (column 'id': image file not found)" in printed


def test_help_documents_the_aggregations(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prepare", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--vlfeedback_aggregation {mean,min,helpfulness,faithfulness}" in text
    for meaning in (
        "mean: the mean of the aspects that have a numeric rating",
        "min: the lowest of the aspects that have a numeric rating",
        "helpfulness: the Helpfulness rating alone",
        "faithfulness: the Visual Faithfulness rating alone",
        "mean and min leave out N/A and missing ratings",
    ):
        assert meaning in text


def test_no_usable_rows_is_one_line_naming_the_drops(tmp_path, capsys):
    rows = [row for row in vlfeedback_rows() if row["id"] == "1"]
    hub_dataset(rows, small_images(1)).save_to_disk(str(tmp_path / "hub"))
    assert cli.main(["prepare", "vlfeedback", str(tmp_path / "hub"), "--output_dir", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bars
    assert len(errors) == 1 and errors[0].startswith(f"trl-nca: error: No usable rows in {tmp_path / 'hub'}: dropped")
    assert "'rows with fewer than 2 scored responses': 1" in errors[0]


def test_ratings_that_are_numbers_and_odd_values():
    annotations = {
        "Helpfulness": {"Rating": 4},  # a number instead of the hub's string
        "Visual Faithfulness": {"Rating": "nan"},  # not finite: left out like "N/A"
        "Ethical Considerations": {"Rating": True},  # a bool is no rating
    }
    assert vlfeedback_reward(annotations, "mean", 0, "completions[0]") == 4.0
    with pytest.raises(ValueError, match=r"Row 7, column 'completions\[2\].annotations.Visual Faithfulness.Rating': "):
        vlfeedback_reward(annotations, "faithfulness", 7, "completions[2]")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        vlfeedback_reward(annotations, "median", 0, "c")


def test_a_row_without_an_image_is_dropped():
    drops = Counter()
    row = {**vlfeedback_rows()[0], "image": None}
    assert vlfeedback_row(row, 5, drops) is None
    assert drops == {"rows (column 'image': no image)": 1}


def test_trl_vision_collator_takes_a_prepared_row(tmp_path):
    """TRL's own DPO vision collator, on the best and worst responses of a prepared row: the image placeholder in
    the prompt is filled with the row's image and expanded to the image's tokens."""
    hub_dataset(vlfeedback_rows(), small_images(4)).save_to_disk(str(tmp_path / "hub"))
    prepare_vlfeedback(str(tmp_path / "hub"), str(tmp_path / "out"))
    row = load_from_disk(str(tmp_path / "out"))["train"][0]
    filled = prepare_multimodal_messages(row["prompt"], images=row["images"])
    assert filled[0]["content"][0] == {"type": "image", "text": None, "image": row["images"][0]}
    best, worst = max(range(4), key=row["rewards"].__getitem__), min(range(4), key=row["rewards"].__getitem__)
    pair = {
        "images": row["images"],
        "prompt": row["prompt"],
        "chosen": row["completions"][best],
        "rejected": row["completions"][worst],
    }
    processor = build_vlm_processor("llava")
    batch = DataCollatorForVisionPreference(processor)([pair])
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [16, 16]  # chosen and rejected rows
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    text = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.replace("<image>" * 16, "<image>") == (
        "<|im_start|>user\n<image>What is in the picture?<|im_end|>\n<|im_start|>assistant\nr0<|im_end|>\n"
    )
