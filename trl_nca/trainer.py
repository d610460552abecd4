"""`NCATrainer` and `InfoNCATrainer`: TRL's `DPOTrainer` with K scored responses per prompt.

What is overridden, and why (TRL 1.16; these are the only DPOTrainer methods this module replaces):

- `__init__`: turns a plain `DPOConfig` into an `NCAConfig`, builds the K-response collator, and deep-copies a model
  instance as the reference (DPOTrainer would reload it from `config._name_or_path`, which a model built from a config
  does not have). Everything else is DPOTrainer's own constructor.
- `_prepare_dataset`: rows of any accepted layout -> canonical rows -> token ids (DPOTrainer's handles pairs only).
- `_set_signature_columns_if_needed`: the columns the K-response collator reads.
- `compute_ref_log_probs` and `_precompute_ref_logps`: K reference log-probabilities per row instead of two.
- `compute_loss`: the NCA / InfoNCA objective and the K-response metrics, replacing DPO's loss-type switch.

Evaluation, logging, saving, the model card, PEFT handling, `sync_ref_model` and the fused LM head are DPOTrainer's.
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
from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from .collator import DataCollatorForKResponses
from .config import NCAConfig
from .data import convert_to_k_responses
from .losses import infonca_loss, nca_loss
from .metrics import k_response_metrics
from .shared_prompt import SUPPORTED_ATTENTION, DataCollatorForSharedPrompt, attention_mask_for, block_mask_for
from .tokenization import tokenize_k_responses

logger = logging.get_logger(__name__)

# Keys of a collated batch that go into the model's forward; the rest are for the loss
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")

_NCA_PAPER = {
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


def _tokenizer_of(processing_class) -> PreTrainedTokenizerBase:
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


class _KResponseTrainer(DPOTrainer):
    """Shared pipeline of NCATrainer and InfoNCATrainer; subclasses set `loss_fn` (a function of `trl_nca.losses`)."""

    loss_fn: Callable[..., torch.Tensor]
    _paper = _NCA_PAPER

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

        # The reference is the initial policy. DPOTrainer reloads it from the model's hub id or path, which a model
        # built from a config (or changed in memory) does not have; a copy taken now is that initial policy. PEFT
        # disables its adapter instead, and precomputed log-probs need no reference during training.
        if (
            ref_model is None
            and not isinstance(model, str)
            and peft_config is None
            and not is_peft_model(model)
            and not args.precompute_ref_log_probs
        ):
            ref_model = copy.deepcopy(model)

        if processing_class is None:  # as DPOTrainer does, but the collator below needs the pad token now
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            revision = (
                (args.model_init_kwargs or {}).get("revision") if isinstance(args.model_init_kwargs, dict) else None
            )
            processing_class = AutoProcessor.from_pretrained(
                model_id, revision=revision, trust_remote_code=args.trust_remote_code
            )
        tokenizer = _tokenizer_of(processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = args.pad_token or tokenizer.eos_token
        user_collator = data_collator is not None
        if data_collator is None:
            data_collator = DataCollatorForKResponses(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self.reward_temperature = args.reward_temperature
        # The layout needs the loaded model's attention implementation: chosen at the first of the end of
        # `__init__` and the reference precompute that DPOTrainer runs inside it (see `_ensure_layout`)
        self._layout_pending = None if user_collator else (args, tokenizer.pad_token_id)

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
        self._ensure_layout()

    def _ensure_layout(self):
        if self._layout_pending is not None:
            self.data_collator = self._choose_layout(*self._layout_pending)
            self._layout_pending = None

    def _choose_layout(self, args: NCAConfig, pad_token_id: int):
        """The shared-prompt collator where `prompt_sharing` and the attention implementation allow it, else the
        padded one. (Chosen once the model is loaded, since its attention implementation decides.)"""
        padded = self.data_collator
        if args.prompt_sharing == "off":
            return padded
        attn = self.accelerator.unwrap_model(self.model).config._attn_implementation
        reason = None
        if attn not in SUPPORTED_ATTENTION:
            reason = f"attn_implementation={attn!r} cannot take its custom 4D mask (supported: {SUPPORTED_ATTENTION})"
        elif args.truncation_mode != "keep_start":
            reason = f"truncation_mode={args.truncation_mode!r} (it supports 'keep_start')"
        if reason is None:
            return DataCollatorForSharedPrompt(
                pad_token_id=pad_token_id, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of
            )
        if args.prompt_sharing == "on":
            raise ValueError(f"prompt_sharing='on' is not possible here: {reason}. Use 'auto' or 'off'.")
        logger.warning(f"The shared-prompt layout is off because {reason}; using the padded layout.")
        return padded

    # Replaces DPOTrainer._prepare_dataset: any accepted layout -> canonical rows -> prompt_ids + K completion_ids
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        column_names = dataset.column_names or list(next(iter(dataset)))
        if {"prompt_ids", "completion_ids"} <= set(column_names):
            return dataset  # already prepared (e.g. a dataset passed again to `evaluate`)
        if {"image", "images"} & set(column_names):
            raise ValueError(f"{type(self).__name__} trains on text only; the {dataset_name} dataset has images.")
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        tokenizer = _tokenizer_of(processing_class)

        with global_then_local_main_first():
            dataset = convert_to_k_responses(
                dataset, ultrafeedback_reward=args.ultrafeedback_reward, num_proc=args.dataset_num_proc
            )
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"Tokenizing {dataset_name} dataset"
            dataset = dataset.map(tokenize_k_responses, fn_kwargs={"tokenizer": tokenizer}, **map_kwargs)

            # A row whose prompt alone fills `max_length` keeps no response token after `keep_start` truncation
            if args.max_length is not None and args.truncation_mode == "keep_start":
                if isinstance(dataset, Dataset):
                    map_kwargs["desc"] = f"Dropping {dataset_name} rows whose prompt fills max_length"
                before = len(dataset) if isinstance(dataset, Dataset) else None
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length, **map_kwargs)
                if before is None:
                    logger.warning(
                        f"Rows of the {dataset_name} dataset whose prompt has max_length={args.max_length} tokens or "
                        "more are dropped as they stream: they would keep no response token."
                    )
                elif len(dataset) < before:
                    logger.warning(
                        f"Dropped {before - len(dataset)} of {before} rows of the {dataset_name} dataset: their "
                        f"prompt alone has max_length={args.max_length} tokens or more, so no response token would "
                        "remain."
                    )
        return dataset

    # Replaces DPOTrainer's chosen/rejected columns with the K-response ones
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "rewards", "ref_logps"]

    def _model_inputs(self, model, inputs: dict) -> dict:
        kwargs = {key: inputs[key] for key in _MODEL_INPUTS if key in inputs}
        if kwargs["attention_mask"].dim() == 4:  # the shared-prompt layout's custom mask
            config = self.accelerator.unwrap_model(model).config
            if config._attn_implementation == "flex_attention":
                kwargs["attention_mask"] = block_mask_for(inputs["segment_ids"], inputs["row_ids"])
                return kwargs
            dtype = next(model.parameters()).dtype
            if not dtype.is_floating_point:  # quantized weights: masks follow the compute dtype
                dtype = torch.bfloat16 if self.args.bf16 else torch.float32
            kwargs["attention_mask"] = attention_mask_for(kwargs["attention_mask"], config._attn_implementation, dtype)
        return kwargs

    def _sequence_logps(self, model, inputs: dict) -> tuple[torch.Tensor, object]:
        """Summed log-probabilities of every response of the batch, `(N,)` in row-major order of `response_mask`,
        through TRL's fused LM head. Tokens are summed by `response_ids`, so a sequence may hold one response
        (padded layout) or a prompt and all of its responses (shared-prompt layout)."""
        model_kwargs = self._model_inputs(model, inputs)
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        if self.aux_loss_enabled and model is self.model:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs, labels=labels, use_cache=False, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        per_token = outputs.log_probs[:, -(completion_mask.size(1) - 1) :]
        owner = inputs["response_ids"][:, 1:]  # the response each next-token label belongs to
        valid = owner >= 0
        num_responses = int(inputs["response_mask"].sum())
        logps = per_token.new_zeros(num_responses).index_add(0, owner[valid], per_token[valid])
        return logps, outputs

    @staticmethod
    def _per_response(flat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """Put the `(N,)` per-sequence values back at their `(B, K)` (prompt, response) slots; padding gets 0."""
        return flat.new_zeros(response_mask.shape).masked_scatter(response_mask, flat)

    # Replaces DPOTrainer.compute_ref_log_probs: returns the (B, K) reference log-probabilities
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
            flat, _ = self._sequence_logps(model, inputs)
        return self._per_response(flat, inputs["response_mask"])

    # Replaces DPOTrainer._precompute_ref_logps: stores a list of K_i reference log-probabilities per row
    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        self._ensure_layout()
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` needs a map-style Dataset, not an IterableDataset; set "
                "`precompute_ref_log_probs=False` to compute reference log-probabilities on the fly."
            )
        # Cached like TRL: one Arrow file per (dataset, reference weights), shared by all ranks
        fingerprint = [Hasher.hash((dataset._fingerprint, self._precompute_model_hash, "k-responses"))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        if os.path.exists(cache_file):
            return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

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
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model

        ref_logps: list[list[float]] = []
        for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset"):
            values = self.compute_ref_log_probs(model, batch).float()
            mask = batch["response_mask"]
            # Ranks may hold batches of different K: pad to a common width before gathering
            values = self.accelerator.pad_across_processes(values, dim=1, pad_index=0)
            mask = self.accelerator.pad_across_processes(mask, dim=1, pad_index=False)
            values, mask = self.accelerator.gather_for_metrics((values, mask))
            ref_logps.extend(row[row_mask].tolist() for row, row_mask in zip(values.cpu(), mask.cpu().bool()))

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

    # Replaces DPOTrainer.compute_loss (and its private `_compute_loss`)
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        response_mask = inputs["response_mask"]
        rewards = inputs["rewards"]

        policy_flat, outputs = self._sequence_logps(model, inputs)
        policy_logps = self._per_response(policy_flat, response_mask).float()
        if self.precompute_ref_logps:
            ref_logps = inputs["ref_logps"].float()
        else:
            ref_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs).float()

        per_prompt = type(self).loss_fn(
            policy_logps,
            ref_logps,
            rewards,
            response_mask,
            beta=self.beta,
            reward_temperature=self.reward_temperature,
        )
        loss = per_prompt.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_metrics(mode, inputs, outputs, policy_logps, ref_logps)

        if return_outputs:
            # compute_metrics needs logits, which the fused LM head does not build: one more forward, as DPOTrainer
            with torch.no_grad():
                outputs = model(**self._model_inputs(model, inputs))
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, outputs, policy_logps, ref_logps) -> None:
        response_mask, rewards = inputs["response_mask"], inputs["rewards"]
        metrics = k_response_metrics(policy_logps, ref_logps, rewards, response_mask, beta=self.beta)
        # One gather for all per-prompt metrics; NaN marks a prompt where a metric is undefined
        gathered = self.accelerator.gather_for_metrics(torch.stack(list(metrics.values()), dim=1))
        for key, column in zip(metrics, gathered.unbind(dim=1)):
            if not column.isnan().all():
                self._metrics[mode][key].append(column.nanmean().item())

        # Per-token statistics over all responses (entropy) and over the best responses (token accuracy)
        owner = inputs["response_ids"][:, 1:]
        shift_mask = owner >= 0
        seq_len = shift_mask.size(1)
        entropy = outputs.entropy[:, -seq_len:].detach()
        sums = torch.stack([(entropy * shift_mask).sum(), shift_mask.sum().to(entropy.dtype)])
        flat_index = torch.full(response_mask.shape, -1, device=response_mask.device, dtype=torch.long)
        flat_index[response_mask] = torch.arange(int(response_mask.sum()), device=response_mask.device)
        best = rewards.masked_fill(~response_mask, float("-inf")).argmax(dim=-1, keepdim=True)
        best_mask = torch.isin(owner, flat_index.gather(-1, best).squeeze(-1)) & shift_mask
        is_top1 = outputs.is_top1[:, -seq_len:]
        token_sums = torch.stack([(is_top1 & best_mask).sum(), best_mask.sum()]).to(entropy.dtype)
        sums = self.accelerator.gather_for_metrics(torch.cat([sums, token_sums]).unsqueeze(0)).sum(dim=0)
        self._metrics[mode]["entropy"].append((sums[0] / sums[1].clamp(min=1)).item())
        self._metrics[mode]["mean_token_accuracy"].append((sums[2] / sums[3].clamp(min=1)).item())
        if mode == "train":
            real_tokens = inputs["padding_mask"] if "padding_mask" in inputs else inputs["attention_mask"]
            num_tokens = self.accelerator.gather_for_metrics(real_tokens.sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class NCATrainer(_KResponseTrainer):
    """Trainer for NCA (Chen et al., NeurIPS 2024): each of K scored responses is classified against noise.

    Takes exactly `trl.DPOTrainer`'s constructor arguments. The dataset may hold K-response rows (`prompt`,
    `completions`, `rewards`), DPO preference pairs, raw UltraFeedback rows, or `A0..A{K-1}` ranked columns; `args`
    may be an [`NCAConfig`] or a plain `DPOConfig`. On preference pairs its loss is TRL's `nca_pair`.
    """

    loss_fn = staticmethod(nca_loss)
    _tag_names = ["trl", "trl-nca", "nca"]
    _name = "NCA"


class InfoNCATrainer(_KResponseTrainer):
    """Trainer for InfoNCA (Chen et al., NeurIPS 2024): a K-way classification among scored responses.

    Takes exactly `trl.DPOTrainer`'s constructor arguments and the same datasets as [`NCATrainer`]. On preference
    pairs its loss is DPO's (`loss_type="sigmoid"`).
    """

    loss_fn = staticmethod(infonca_loss)
    _tag_names = ["trl", "trl-nca", "infonca"]
    _name = "InfoNCA"
