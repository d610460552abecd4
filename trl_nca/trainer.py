"""`NCATrainer` and `InfoNCATrainer`: TRL's `DPOTrainer` with K scored responses per prompt.

The DPOTrainer methods replaced here, each a TRL-private contract pinned against the installed TRL by
`tests/test_trl_contracts.py` (written against TRL 1.16.0):

- `__init__`: turns a plain `DPOConfig` into an `NCAConfig`, checks `loss_type` against the class, deep-copies a
  model instance as the reference, and installs the K-response collator of the allowed layouts and the LM head
  once DPOTrainer's own constructor (processing class, pad token, PEFT, reference model) has run.
- `_prepare_dataset`: rows of any accepted layout -> canonical rows -> token ids (DPOTrainer's handles pairs only).
- `_set_signature_columns_if_needed`: the columns the K-response collators read.
- `compute_ref_log_probs` and `_precompute_ref_logps`: K reference log-probabilities per row instead of two.
- `compute_loss`: the NCA / InfoNCA objective and the K-response metrics, replacing DPO's loss-type switch.
- `log` (extended): the metrics stay on the device between logging steps and are read there, once.

Evaluation, logging, saving, the model card, PEFT and `sync_ref_model` are DPOTrainer's; so is the fused LM head
where it scores only response tokens (CUDA), and `trl_nca.scoring`'s response-only head is used elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import os
import textwrap
from collections.abc import Callable

import torch
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from .config import NCAConfig
from .data import convert_to_k_responses
from .dropout import disable_dropout
from .forward import response_token_logps, sum_by_response
from .layout_check import run_offline_check
from .layouts import (
    LAYOUTS_OF_SETTING,
    DataCollatorForAnyLayout,
    DataCollatorForImageRows,
    ModelShape,
    cache_blocker,
    choose_layout,
    has_images,
    images_blocker,
    length_dependent_rope,
    make_collator,
    mask_blocker,
    ranks_in_step,
    sequences_per_response,
    sharded_parameters,
    shared_blocker,
)
from .layouts.cost import device_memory_budget
from .losses import infonca_loss, nca_loss
from .metrics import IfDefined, k_response_metrics, read_device_metrics, token_metric_sums
from .scoring import add_response_head, drop_foreign_forward, head_choice
from .tokenization import prepare_k_response_dataset

logger = logging.get_logger(__name__)

NCA_PAPER = {
    "title": "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    "id": "2402.05369",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{chen2024noise,
            title        = {{Noise Contrastive Alignment of Language Models with Explicit Rewards}},
            author       = {Huayu Chen and Guande He and Lifan Yuan and Ganqu Cui and Hang Su and Jun Zhu},
            year         = 2024,
            booktitle    = {Advances in Neural Information Processing Systems 37 (NeurIPS 2024)},
            eprint       = {2402.05369},
        }"""),
}


def _check_not_empty(dataset, name: str) -> None:
    """An empty dataset stops here with a clear error (DPOTrainer would raise StopIteration reading its first row)."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: there is nothing to train on.")
    if isinstance(dataset, IterableDataset) and next(iter(dataset), None) is None:
        raise ValueError(f"The {name} dataset is empty (the stream has no row): there is nothing to train on.")


class _KResponseTrainer(DPOTrainer):
    """Shared pipeline of NCATrainer and InfoNCATrainer; subclasses set `loss_fn` (a function of `trl_nca.losses`)
    and `pair_loss_type` (the DPO `loss_type` their loss equals on preference pairs)."""

    loss_fn: Callable[..., torch.Tensor]
    pair_loss_type: str
    _paper = NCA_PAPER

    # Replaces DPOTrainer.__init__ (TRL 1.16.0), with the same signature; DPOTrainer's constructor does the work
    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = NCAConfig(f"{model_name.split('/')[-1] or 'model'}-{self._name}")
        elif not isinstance(args, NCAConfig):
            args = NCAConfig.from_dpo_config(args)
        if args.loss_type not in (["sigmoid"], [self.pair_loss_type]):
            raise ValueError(
                f"{type(self).__name__} computes {self._name}, which on preference pairs is DPO's "
                f"loss_type={self.pair_loss_type!r}; loss_type={args.loss_type!r} names another loss. Leave loss_type "
                "at its default or use the trainer of that loss."
            )
        _check_not_empty(train_dataset, "train")
        for name, dataset in eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]:
            _check_not_empty(dataset, name)
        self._images = train_dataset is not None and has_images(
            train_dataset.column_names or list(next(iter(train_dataset)))
        )
        if self._images:
            train_dataset, eval_dataset = self._image_rows(train_dataset, eval_dataset, args, processing_class)
            if compute_metrics is not None:
                raise ValueError(
                    "`compute_metrics` with rows with images is not supported: its logits come from one more forward "
                    "per response, which does not carry the images."
                )
        # The reference is the initial policy. DPOTrainer reloads it from the model's hub id or path, which a model
        # built from a config (or changed in memory) does not have; a copy taken now is that initial policy. PEFT
        # disables its adapter instead, and precomputed log-probs need no reference during training.
        for each in (model, ref_model):
            drop_foreign_forward(each)
        if ref_model is None and not (isinstance(model, str) or peft_config or is_peft_model(model)):
            if not args.precompute_ref_log_probs:
                ref_model = copy.deepcopy(model)
        self.reward_temperature = args.reward_temperature
        # Dropout off before DPOTrainer's constructor, which may precompute the reference log-probabilities with a
        # model built in memory (in training mode); again after it, for a model TRL loads from a name
        if args.disable_dropout:
            for each in (model, ref_model):
                if isinstance(each, torch.nn.Module):
                    disable_dropout(each)
        # Without a collator of the user's, DPOTrainer builds its pair collator (after setting and checking the pad
        # token); the K-response one replaces it once the model's attention implementation is known
        self._layout = None if data_collator is None else "user"
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if args.disable_dropout:  # DPOTrainer's disable_dropout_in_model misses functional attention dropout
            for model in (self.model, self.ref_model):
                if model is not None:
                    disable_dropout(model)
        self._use_layout()
        self.add_callback(_LayoutCheck(self))

    @staticmethod
    def _image_rows(train_dataset, eval_dataset, args, processing_class):
        """Rows with images, converted to canonical K-response rows (every row checked) and kept untokenized:
        DPOTrainer skips its dataset preparation for vision rows, and the collator processes the images on the fly
        (`trl_nca.layouts.images`)."""
        if processing_class is not None and not hasattr(processing_class, "image_processor"):  # None: DPO loads it
            raise ValueError(
                "The dataset has images (an `image` or `images` column): pass the model's processor (a ProcessorMixin "
                f"with an image processor) as `processing_class`, not {type(processing_class).__name__}."
            )
        if args.precompute_ref_log_probs:
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported for rows with images (as in DPOTrainer): the images "
                "are processed on the fly. Set `precompute_ref_log_probs=False`."
            )

        def convert(dataset):
            return convert_to_k_responses(dataset, ultrafeedback_reward=args.ultrafeedback_reward)

        if isinstance(eval_dataset, dict):
            eval_dataset = {name: convert(dataset) for name, dataset in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = convert(eval_dataset)
        return convert(train_dataset), eval_dataset

    def _use_layout(self):
        """Install the collator of the layouts `choose_layout` allows and the LM head `head_choice` picks (once;
        DPOTrainer's reference precompute, which runs inside its constructor, needs them before it returns)."""
        if self._layout is not None:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = unwrapped.config
        choice = choose_layout(
            self.args.prompt_sharing,
            config._attn_implementation,
            self.args.truncation_mode,
            self.aux_loss_enabled,
            cache_blocker=cache_blocker(
                unwrapped,
                self.args,
                sharded=sharded_parameters(self),
                ranks_in_step=ranks_in_step(self),
                setting=self.args.prompt_sharing,
                longest=self._longest_sequence(),
            ),
            shared_blocker=shared_blocker(unwrapped),
            mask_blocker=mask_blocker(unwrapped, self._longest_sequence()),
            image_blockers=images_blocker(unwrapped) if self._images else None,
        )
        if self.args.prompt_sharing == "auto" and "padded" not in choice.reasons and choice.reasons:
            said = "; ".join(f"'{name}' is out: {reason}" for name, reason in choice.reasons.items())
            logger.warning(f"Layouts for prompt_sharing='auto': {', '.join(choice.allowed)} ({said}).")
        self._layout = choice.allowed[0] if len(choice.allowed) == 1 else choice.allowed
        shape = ModelShape.of(
            unwrapped, self.accelerator.device.type, memory_budget=device_memory_budget(self.accelerator.device)
        )
        collators = {
            name: make_collator(
                name,
                pad_token_id=self._tokenizer.pad_token_id,
                max_length=self.args.max_length,
                truncation_mode=self.args.truncation_mode,
                pad_to_multiple_of=self.args.pad_to_multiple_of,
                call_overhead=shape.call_overhead_tokens,
                match_padded_positions=length_dependent_rope(config) is not None,
            )
            for name in choice.allowed
        }
        chooser = DataCollatorForAnyLayout(collators, shape, self.args.max_length) if len(collators) > 1 else None
        self._collators, self._layouts_checked = collators, False
        if self._images:
            self.data_collator = DataCollatorForImageRows(self.processing_class, collators, chooser)
        else:
            self.data_collator = chooser or next(iter(collators.values()))
        # The LM head: TRL's fused head where it already scores only response tokens, ours (response tokens only)
        # elsewhere and for the prompt-cache layout, which ours alone runs
        self._head, why = head_choice(unwrapped, self.accelerator.device)
        logger.info(f"LM head: {'trl-nca response-only' if self._head == 'response' else 'TRL fused'} ({why}).")
        for model in (self.model, self.ref_model):
            if model is not None:
                model = self.accelerator.unwrap_model(model)
                add_response_head(model.get_base_model() if is_peft_model(model) else model)

    def _longest_sequence(self) -> int | None:
        """The longest sequence a batch can hold (`max_length`, padded to `pad_to_multiple_of`), None: unbounded."""
        longest, multiple = self.args.max_length, self.args.pad_to_multiple_of
        return longest if longest is None or not multiple else -(-longest // multiple) * multiple

    # Replaces DPOTrainer._prepare_dataset (TRL 1.16.0): any accepted layout -> prompt_ids + K completion_ids
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        column_names = dataset.column_names or list(next(iter(dataset)))
        if {"prompt_ids", "completion_ids"} <= set(column_names):
            return dataset  # already prepared (e.g. a dataset passed again to `evaluate`)
        if has_images(column_names):  # an eval dataset with images where the train dataset has none
            raise ValueError(
                f"The {dataset_name} dataset has images and the train dataset has none: give both datasets images, or "
                "neither (the collator is chosen from the train dataset, as DPOTrainer's)."
            )
        with global_then_local_main_first():
            return prepare_k_response_dataset(
                dataset,
                self._tokenizer,
                name=dataset_name,
                ultrafeedback_reward=args.ultrafeedback_reward,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                num_proc=args.dataset_num_proc,
                # Every layout but the padded one needs a prompt token per row: a setting without the padded layout
                # refuses a row without one here, before training (`auto` builds the batches that hold one padded)
                prompt_token_needed_by=(
                    None
                    if "padded" in LAYOUTS_OF_SETTING[args.prompt_sharing]
                    else f"prompt_sharing={args.prompt_sharing!r}"
                ),
            )

    # Replaces DPOTrainer._set_signature_columns_if_needed (TRL 1.16.0): the K-response columns
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "rewards", "ordered", "ref_logps"]
            if self._images:  # untokenized: the collator processes the images
                self._signature_columns += ["prompt", "completions", "images", "image", "chat_template_kwargs"]

    def _sequence_logps(self, model, inputs: dict, *, aux_loss: bool = False, token_stats: bool = False):
        """Summed log-probabilities of every response of the batch, `(N,)` in row-major order of `response_mask`,
        and the head's per-token outputs (`ResponseHeadOutput`, flat over the scored tokens) with each scored token's
        response. Tokens are summed by response, whatever the layout. `aux_loss` asks an MoE model for its router
        loss (the policy's forward in `compute_loss`, never a reference forward); `token_stats` asks for the entropy
        and top-1 flags of each token (the policy's metrics; a reference forward needs neither)."""
        extra = {"output_router_logits": aux_loss} if self.aux_loss_enabled else {}
        outputs, owner = response_token_logps(
            model, inputs, head=self._head, mask_dtype=self._mask_dtype(), token_stats=token_stats, **extra
        )
        return sum_by_response(outputs.log_probs, owner, int(inputs["response_mask"].sum())), outputs, owner

    def _mask_dtype(self) -> torch.dtype:
        # An additive (eager) mask follows the compute dtype: autocast's under bf16/fp16, else float32
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32

    @staticmethod
    def _per_response(flat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Put the `(N,)` per-response values back at their `(B, K)` (prompt, response) slots; padding gets 0."""
        return flat.new_zeros(response_mask.shape).masked_scatter(response_mask, flat)

    # Replaces DPOTrainer.compute_ref_log_probs (TRL 1.16.0): the (B, K) reference log-probabilities
    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probabilities of every response of a collated batch, `(B, K)` (0 at padded slots)."""
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            flat, _, _ = self._sequence_logps(model, inputs)
        return self._per_response(flat, inputs["response_mask"])

    # Replaces DPOTrainer._precompute_ref_logps (TRL 1.16.0): a list of K_i reference log-probabilities per row,
    # cached like TRL's (one Arrow file per dataset and reference weights, shared by all ranks)
    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        self._use_layout()
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` needs a map-style Dataset, not an IterableDataset; set "
                "`precompute_ref_log_probs=False` to compute reference log-probabilities on the fly."
            )
        if not dataset.cache_files:
            # An in-memory dataset has no cache folder that all ranks share (each would look in a temporary folder of
            # its own): every rank holds all the gathered values, so each adds the column in memory
            return dataset.add_column("ref_logps", self._reference_logps_of(dataset, name, batch_size))
        fingerprint = [Hasher.hash((dataset._fingerprint, self._precompute_model_hash, "k-responses"))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        if not os.path.exists(cache_file):
            ref_logps = self._reference_logps_of(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                dataset.map(
                    lambda _, index: {"ref_logps": ref_logps[index]},
                    with_indices=True,
                    remove_columns=dataset.column_names,
                    new_fingerprint=fingerprint[0],
                    cache_file_name=cache_file,
                    desc=f"Caching reference log probs for {name} dataset",
                )
            self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    def _reference_logps_of(self, dataset: Dataset, name: str, batch_size: int) -> list[list[float]]:
        """Every row's K_i reference log-probabilities, in dataset order, on every process."""
        loader = self.accelerator.prepare(
            DataLoader(
                dataset.select_columns(["prompt_ids", "completion_ids", "rewards"]),
                batch_size=batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                shuffle=False,
            )
        )
        # As in DPOTrainer: before `train`, DeepSpeed's parameters are not placed yet; an inference engine places them
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        run_offline_check(self, model)  # the reference column is built with the layouts the check keeps
        ref_logps: list[list[float]] = []
        for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset"):
            values, mask = self.compute_ref_log_probs(model, batch).float(), batch["response_mask"]
            # Ranks may hold batches of different K: pad to a common width before gathering
            values = self.accelerator.pad_across_processes(values, dim=1, pad_index=0)
            mask = self.accelerator.pad_across_processes(mask, dim=1, pad_index=False)
            values, mask = self.accelerator.gather_for_metrics((values, mask))
            ref_logps.extend(row[row_mask].tolist() for row, row_mask in zip(values.cpu(), mask.cpu().bool()))
        return ref_logps

    # Extends Trainer.evaluation_loop: the layout check runs before an evaluation that comes first
    def evaluation_loop(self, *args, **kwargs):
        run_offline_check(self, self.model_wrapped)
        return super().evaluation_loop(*args, **kwargs)

    # Replaces DPOTrainer.compute_loss (TRL 1.16.0) and its private `_compute_loss`
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        response_mask = inputs["response_mask"]
        policy_flat, outputs, owner = self._sequence_logps(model, inputs, aux_loss=True, token_stats=True)
        policy_logps = self._per_response(policy_flat, response_mask).float()
        if self.precompute_ref_logps:
            ref_logps = inputs["ref_logps"].float()
        else:
            ref_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs).float()
        loss = (
            type(self)
            .loss_fn(
                policy_logps,
                ref_logps,
                inputs["rewards"],
                response_mask,
                beta=self.beta,
                reward_temperature=self.reward_temperature,
                ordered=inputs.get("ordered"),
            )
            .mean()
        )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean()
            self._metrics[mode]["aux_loss"].append(aux_loss)  # a device tensor, read by `log`
        self._log_metrics(mode, inputs, outputs, owner, policy_logps, ref_logps)
        if return_outputs:
            # compute_metrics needs logits, which the response heads do not build: one more forward, as DPOTrainer's,
            # on one prompt+response sequence per response whatever the layout (DPOTrainer's are chosen, rejected)
            plain = sequences_per_response(inputs, self._tokenizer.pad_token_id, self.args.pad_to_multiple_of)
            inputs["input_ids"] = plain["input_ids"]  # DPOTrainer.prediction_step reads its labels from there
            with torch.no_grad():
                outputs = model(**plain)
            # prompt tuning prepends virtual positions: keep those of the sequences' tokens
            outputs.logits = outputs.logits[:, -plain["input_ids"].size(1) :]
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, outputs, owner, policy_logps, ref_logps) -> None:
        """Appends the step's metrics to `self._metrics[mode]` as device tensors, as DPOTrainer appends floats;
        `log` reads them at the next logging step (a read here would make the host wait for the device every
        micro-batch). The token count `_total_train_tokens` is a device tensor too."""
        response_mask, rewards = inputs["response_mask"], inputs["rewards"]
        metrics = k_response_metrics(
            policy_logps, ref_logps, rewards, response_mask, beta=self.beta, ordered=inputs.get("ordered")
        )
        # One gather for all per-prompt metrics; NaN marks a prompt where a metric is undefined, and a step where no
        # prompt defines a metric does not count in its mean
        gathered = self.accelerator.gather_for_metrics(torch.stack(list(metrics.values()), dim=1))
        means, defined = gathered.nanmean(dim=0), ~gathered.isnan().all(dim=0)
        for key, mean, is_defined in zip(metrics, means, defined):
            self._metrics[mode][key].append(IfDefined(mean, is_defined))
        sums = token_metric_sums(outputs.entropy, outputs.is_top1, owner, rewards, response_mask)
        sums = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(dim=0)
        self._metrics[mode]["entropy"].append(sums[0] / sums[1].clamp(min=1))
        self._metrics[mode]["mean_token_accuracy"].append(sums[2] / sums[3].clamp(min=1))
        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["num_tokens"].reshape(1)).sum()
            self._total_train_tokens = self._total_train_tokens + num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # Extends DPOTrainer.log (TRL 1.16.0): reads the device values `_log_metrics` appended once per logging step (one
    # `.tolist()` per dtype), into the numbers DPOTrainer.log averages, those it logged when read every micro-batch
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        read_device_metrics(self._metrics["train" if self.model.training else "eval"])
        super().log(logs, start_time)


class _LayoutCheck(TrainerCallback):
    """Runs the layout check when training starts (if nothing ran it before): the model is wrapped (DDP, DeepSpeed)
    and no batch has been collated yet."""

    def __init__(self, trainer: _KResponseTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        run_offline_check(self.trainer, self.trainer.model_wrapped)


class NCATrainer(_KResponseTrainer):
    """Trainer for NCA (Chen et al., NeurIPS 2024): each of K scored responses is classified against noise.

    Takes exactly `trl.DPOTrainer`'s constructor arguments. The dataset may hold K-response rows (`prompt`,
    `completions`, `rewards`), ranked lists, DPO preference pairs, raw UltraFeedback rows, or `A0..A{K-1}` ranked
    columns; `args` may be an [`NCAConfig`] or a plain `DPOConfig`. On preference pairs its loss is TRL's
    `nca_pair`.
    """

    loss_fn = staticmethod(nca_loss)
    pair_loss_type = "nca_pair"
    _tag_names = ["trl", "trl-nca", "nca"]
    _name = "NCA"


class InfoNCATrainer(_KResponseTrainer):
    """Trainer for InfoNCA (Chen et al., NeurIPS 2024): a K-way classification among scored responses.

    Takes exactly `trl.DPOTrainer`'s constructor arguments and the same datasets as [`NCATrainer`]. On preference
    pairs its loss is DPO's (`loss_type="sigmoid"`).
    """

    loss_fn = staticmethod(infonca_loss)
    pair_loss_type = "sigmoid"
    _tag_names = ["trl", "trl-nca", "infonca"]
    _name = "InfoNCA"
