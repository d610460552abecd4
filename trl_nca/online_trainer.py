"""`OnlineNCATrainer` and `OnlineInfoNCATrainer`: NCA and InfoNCA on TRL's `GRPOTrainer` loop.

Each step samples K completions per prompt from the current policy, scores them with reward functions (GRPO's
signature, reward models, async functions, vLLM, gathering across processes: all TRL's), turns each group's rewards
into soft labels p = softmax(R / alpha), and trains with `trl_nca.losses` on the group. The GRPOTrainer methods
replaced here (TRL 1.16.0; pinned in `tests/test_trl_contracts.py`), as TRL's own GRPO variants do (e.g. GMPO):

- `__init__`: converts a plain `GRPOConfig`, keeps GRPO from building a reference model it would not use (the
  sampler reference) or could not rebuild (a model instance built from a config), wraps the reward functions with
  the checks of `trl_nca.rewards`, and refuses settings that would split a group where the loss needs it whole.
- `_calculate_rewards`: keeps the gathered rewards of every function for the labels (GRPO's own advantages are
  computed and logged as usual, but not trained on).
- `_generate_and_score_completions`: adds each completion's soft label, its group's size and its group id.
- `_prepare_inputs`: GRPO's, with the generation batch shuffled by whole groups instead of by completion, so that a
  micro-batch always holds whole groups (InfoNCA's log-softmax needs them).
- `_get_train_sampler`: GRPO's sampler, reseeded each epoch, so that a resumed run sees the prompts in the same order.
- `_compute_loss`: the NCA or InfoNCA loss and its metrics, instead of GRPO's clipped surrogate.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import (
    RepeatSampler,
    add_fused_lm_head,
    disable_dropout_in_model,
    get_config_model_id,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .losses import infonca_loss, nca_terms, soft_labels
from .online_config import OnlineNCAConfig
from .rewards import check_reward_values, reward_name
from .trainer import NCA_PAPER


def _checked(func, group_size: int):
    """A reward function whose values are checked (`trl_nca.rewards.check_reward_values`; `None`, GRPO's "not
    applicable", passes), with the name and the sync/async kind of the original."""
    name = reward_name(func)

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def checked_async(prompts, completions, **kwargs):
            values = await func(prompts=prompts, completions=completions, **kwargs)
            return check_reward_values(name, values, prompts, group_size, allow_none=True)

        return checked_async

    @functools.wraps(func)
    def checked(prompts, completions, **kwargs):
        values = func(prompts=prompts, completions=completions, **kwargs)
        return check_reward_values(name, values, prompts, group_size, allow_none=True)

    return checked


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler`, with the order of each epoch drawn from `seed + epoch` (`set_epoch`, which Trainer calls
    every epoch) instead of from a generator that only advances: a run resumed from a checkpoint then sees the
    prompts in the order of the uninterrupted run. The first epoch's order is `RepeatSampler`'s."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)


def shuffle_groups(batch: dict, group_size: int) -> dict:
    """Shuffle a generation batch by whole groups of `group_size` consecutive completions (as TRL's
    `shuffle_sequence_dict` shuffles by completion): the completions of a prompt stay together and in order."""
    size = len(next(value for value in batch.values() if value is not None and not _is_scalar(value)))
    order = torch.randperm(size // group_size)
    index = (order[:, None] * group_size + torch.arange(group_size)[None, :]).flatten()

    def permute(value):
        if value is None or _is_scalar(value):
            return value
        return value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index]

    return {key: permute(value) for key, value in batch.items()}


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 0


class _OnlineKResponseTrainer(GRPOTrainer):
    """Shared loop of OnlineNCATrainer and OnlineInfoNCATrainer; subclasses say whether their loss needs each group
    whole in one micro-batch (`needs_whole_groups`)."""

    needs_whole_groups: bool
    _paper = NCA_PAPER

    # Replaces GRPOTrainer.__init__ (TRL 1.16.0), with the same signature; GRPOTrainer's constructor does the work
    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = OnlineNCAConfig(f"{model_name.split('/')[-1] or 'model'}-{self._name}")
        elif not isinstance(args, OnlineNCAConfig):
            args = OnlineNCAConfig.from_grpo_config(args)
        self._check_group_settings(args)
        train_dataset = kwargs.get("train_dataset")
        if train_dataset is not None:
            columns = train_dataset.column_names or list(next(iter(train_dataset)))
            if "prompt" not in columns:
                raise ValueError(
                    f"The train dataset needs a `prompt` column, as GRPOTrainer's does; it has {columns}."
                )
        self.reference = args.reference
        self.reward_temperature = args.reward_temperature
        # GRPO reads its `beta` as "keep a reference model and compute its log-probabilities". The sampler reference
        # needs neither. A model instance (not PEFT) would be reloaded from its hub id, which a model built in memory
        # has not: the reference is then a copy of it, taken now, while it is the initial policy.
        peft = kwargs.get("peft_config") is not None or (not isinstance(model, str) and is_peft_model(model))
        copy_reference = self.reference == "initial" and not isinstance(model, str) and not peft
        initial = copy.deepcopy(model) if copy_reference else None
        nca_beta = args.beta
        if self.reference == "sampler" or copy_reference:
            args.beta = 0.0
        sync_ref_model, args.sync_ref_model = args.sync_ref_model, args.sync_ref_model and not copy_reference
        try:
            super().__init__(model, reward_funcs, args=args, **kwargs)
        finally:
            args.beta, args.sync_ref_model = nca_beta, sync_ref_model
        self.nca_beta = nca_beta
        self.beta = nca_beta if self.reference == "initial" else 0.0
        if copy_reference:
            self.ref_model = self._prepare_reference(initial)
            if sync_ref_model:
                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.reward_funcs = [
            f if isinstance(f, torch.nn.Module) else _checked(f, self.num_generations) for f in self.reward_funcs
        ]

    # Replaces GRPOTrainer._get_train_sampler (TRL 1.16.0): the same sampler, reseeded per epoch (see above)
    def _get_train_sampler(self, dataset=None):
        return EpochSeededRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _check_group_settings(self, args: OnlineNCAConfig) -> None:
        if not self.needs_whole_groups:
            return
        for batch_size, generations, which in [
            (args.per_device_train_batch_size, args.num_generations, "train"),
            (args.per_device_eval_batch_size, args.num_generations_eval or args.num_generations, "eval"),
        ]:
            if batch_size % generations != 0:
                raise ValueError(
                    f"{self._name}'s log-softmax needs each group of completions whole in one loss computation: "
                    f"per_device_{which}_batch_size ({batch_size}) must be a multiple of the group size "
                    f"({generations}). OnlineNCATrainer has no such constraint."
                )

    def _prepare_reference(self, model):
        """The reference copy, set up as GRPOTrainer sets up its own (fused head, dropout, device, sharding)."""
        if self.args.disable_dropout:
            disable_dropout_in_model(model)
        add_fused_lm_head(model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    # Replaces GRPOTrainer._calculate_rewards (TRL 1.16.0): the same, keeping the gathered rewards for the labels
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    # Replaces GRPOTrainer._generate_and_score_completions (TRL 1.16.0): adds the labels of every group
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards_per_func = self._rewards_per_func  # (all processes' completions, reward functions)
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        # A completion counts in its group if some reward function scored it and it kept a token (GRPO masks
        # truncated completions when `mask_truncated_completions`)
        kept = self.accelerator.gather(output["completion_mask"].any(dim=1))
        valid = ~torch.isnan(rewards_per_func).all(dim=1) & kept
        groups = rewards.view(-1, group_size)
        valid_groups = valid.view(-1, group_size)
        labels = soft_labels(groups, valid_groups, reward_temperature=self.reward_temperature)
        group_sizes = valid_groups.sum(dim=1, keepdim=True).expand_as(groups)
        masked = groups.masked_fill(~valid_groups, torch.nan)
        tied = torch.nan_to_num(masked.nan_to_num(-torch.inf).amax(1) - masked.nan_to_num(torch.inf).amin(1)) == 0

        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        first = self.accelerator.process_index * len(inputs)
        output.update(
            nca_rewards=rewards[local],
            nca_labels=labels.flatten()[local],
            nca_group_size=group_sizes.flatten()[local],
            nca_valid=valid[local],
            nca_group=(torch.arange(first, first + len(inputs), device=rewards.device) // group_size),
        )
        self._metrics[mode]["frac_tied_groups"].append(tied.float().mean().item())
        # The completions table shows what NCA trains on instead of GRPO's advantages: p_k - 1/K, the advantage of
        # the policy gradient NCA takes at r = 0 (see docs/math.md)
        advantages = torch.where(valid, labels.flatten() - 1.0 / group_sizes.flatten().clamp(min=1), 0.0)
        for _ in range(min(len(advantages), len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(advantages.tolist())
        return output

    # Replaces GRPOTrainer._prepare_inputs (TRL 1.16.0) to shuffle by whole groups; the rest is GRPO's buffering
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = shuffle_groups(split_pixel_values_by_grid(batch), self._shuffle_unit(len(generation_batch)))
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _shuffle_unit(self, size: int) -> int:
        # Whole groups where a process holds whole groups (always for InfoNCA); NCA's loss is a sum over
        # completions, so where a group spans processes, its completions are shuffled one by one, as GRPO does
        return self.num_generations if size % self.num_generations == 0 else 1

    # Replaces GRPOTrainer._compute_loss (TRL 1.16.0)
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        logps = (per_token_logps * mask).sum(dim=1)
        if self.reference == "initial":
            ref_per_token_logps = inputs["ref_per_token_logps"]
        else:
            # The policy that sampled the group; when no update happened since (one update per generation, GRPO's
            # default), that is the current policy, whose log-probabilities GRPO then does not store
            ref_per_token_logps = inputs.get("old_per_token_logps")
            if ref_per_token_logps is None:
                ref_per_token_logps = per_token_logps.detach()
        ref_logps = (ref_per_token_logps * mask).sum(dim=1)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        loss = self._group_loss(logps, ref_logps, inputs, group_size)
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss
        self._log_step_metrics(mode, logps, ref_logps, entropies, mask, inputs)
        return loss

    def _group_loss(self, logps, ref_logps, inputs, group_size) -> torch.Tensor:
        raise NotImplementedError

    def _log_step_metrics(self, mode, logps, ref_logps, entropies, mask, inputs) -> None:
        valid = inputs["nca_valid"]
        logratio = (logps - ref_logps).detach()
        labels = inputs["nca_labels"]
        above = labels > 1.0 / inputs["nca_group_size"].clamp(min=1)  # completions with more than a uniform share
        sums = torch.stack(
            [
                (entropies * mask).sum(),
                mask.sum(),
                (logratio * valid).sum(),
                valid.sum(),
                (logratio * (above & valid)).sum(),
                (above & valid).sum(),
            ]
        ).float()
        sums = self.accelerator.reduce(sums, reduction="sum")
        self._metrics[mode]["entropy"].append((sums[0] / sums[1].clamp(min=1)).item())
        self._metrics[mode]["logratio/mean"].append((sums[2] / sums[3].clamp(min=1)).item())
        if sums[5] > 0:
            self._metrics[mode]["logratio/labelled"].append((sums[4] / sums[5]).item())


class OnlineNCATrainer(_OnlineKResponseTrainer):
    """Online NCA: K completions per prompt from the current policy, scored by reward functions, trained with NCA.

    Takes exactly `trl.GRPOTrainer`'s constructor arguments (a `prompt` column, GRPO's reward-function signature);
    `args` may be an [`OnlineNCAConfig`] or a plain `GRPOConfig`. NCA's loss is a sum of per-completion terms once
    the labels are known, so the labels are computed when a group is scored and any micro-batching works.
    """

    needs_whole_groups = False
    _tag_names = ["trl", "trl-nca", "nca", "online"]
    _name = "OnlineNCA"

    def _group_loss(self, logps, ref_logps, inputs, group_size):
        model_rewards = self.nca_beta * (logps - ref_logps)
        terms = nca_terms(model_rewards, inputs["nca_labels"], inputs["nca_group_size"].clamp(min=1))
        terms = torch.where(inputs["nca_valid"], terms, torch.zeros_like(terms))
        # mean over groups = sum over completions / number of groups (this micro-batch holds len / K groups' worth)
        return terms.sum() * group_size / len(terms)


class OnlineInfoNCATrainer(_OnlineKResponseTrainer):
    """Online InfoNCA: as [`OnlineNCATrainer`], with InfoNCA's K-way classification on each group.

    InfoNCA's log-softmax runs over a whole group, so `per_device_train_batch_size` (and the eval one) must be a
    multiple of `num_generations`; groups are shuffled whole, so each micro-batch holds whole groups.
    """

    needs_whole_groups = True
    _tag_names = ["trl", "trl-nca", "infonca", "online"]
    _name = "OnlineInfoNCA"

    def _group_loss(self, logps, ref_logps, inputs, group_size):
        group = inputs["nca_group"]
        whole = len(group) % group_size == 0 and bool((group.view(-1, group_size) == group[::group_size, None]).all())
        if not whole:
            raise RuntimeError(
                "A micro-batch holds part of a group: InfoNCA needs whole groups (this is a bug of trl-nca, please "
                "report it with your settings)."
            )

        def by_group(values):
            return values.view(-1, group_size)

        return infonca_loss(
            by_group(logps),
            by_group(ref_logps),
            by_group(inputs["nca_rewards"]),
            by_group(inputs["nca_valid"]),
            beta=self.nca_beta,
            reward_temperature=self.reward_temperature,
        ).mean()
