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
- `_prepare_inputs` (from `trl_nca.group_forward.PromptSharingMixin`): GRPO's, with the generation batch shuffled by
  whole groups instead of by completion, so that a micro-batch always holds whole groups (InfoNCA's log-softmax
  needs them).
- `_get_train_sampler`: GRPO's sampler, reseeded each epoch, so that a resumed run sees the prompts in the same order.
- `_compute_loss`: the NCA or InfoNCA loss and its metrics, instead of GRPO's clipped surrogate. The policy forward
  is GRPO's `_get_per_token_logps_and_entropies`, given every batch field that GRPO's own `_compute_loss` gives it
  (images included; the names are read from that method's signature).
- `_save_checkpoint` / `_load_optimizer_and_scheduler`: GRPO's, plus the generation buffer and the micro-step
  counter, so that a checkpoint saved between two generations resumes on the same completions.
- `evaluate`: InfoNCA checks that an evaluation batch holds whole groups before evaluating.
- `_get_per_token_logps_and_entropies` (from `trl_nca.group_forward.PromptSharingMixin`): every forward encodes each
  prompt once per group, through the offline trainers' layouts (`prompt_sharing`).

What each `GRPOConfig` field does here (works as in GRPO, has an NCA meaning, or is refused) is the table in
`docs/online.md`. `tests/test_trl_contracts.py` pins what still mirrors GRPO's code against GRPO's own output.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os

import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import (
    add_fused_lm_head,
    get_config_model_id,
)

from .dropout import disable_dropout, has_active_dropout
from .group_forward import PromptSharingMixin
from .losses import infonca_loss, nca_terms
from .metrics import IfDefined, read_device_metrics
from .online_config import OnlineNCAConfig
from .online_groups import (
    EpochSeededRepeatSampler,
    check_prompts,
    checked_reward,
    group_labels,
    named_datasets,
)
from .rewards import check_reward_signature, named_reward, reward_name
from .scoring import drop_foreign_forward
from .trainer import NCA_PAPER

logger = logging.getLogger(__name__)

# The batch fields that GRPOTrainer._compute_loss hands to `_get_per_token_logps_and_entropies` besides the ids and
# masks (images: pixel_values, image_grid_thw, num_images, ...), read from that method's signature so that a field a
# TRL release adds there reaches our policy forward too (its old and reference forwards are GRPO's own)
FORWARD_FIELDS = tuple(
    name
    for name, parameter in inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters.items()
    if parameter.default is None and name != "batch_size"
)
GENERATION_STATE = "trl_nca_generation_state_{}.pt"  # one file per process in each checkpoint folder


class _OnlineKResponseTrainer(PromptSharingMixin, GRPOTrainer):
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
        self._check_group_settings(args, evaluating=args.eval_strategy != "no")
        # A Python function GRPO could not call stops here, not at the first step (strings and models are TRL's)
        for func in reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]:
            if callable(func) and not isinstance(func, torch.nn.Module):
                check_reward_signature(func, f"Reward function '{reward_name(func)}'")
        if kwargs.get("environment_factory") is None:  # with an environment, the environment supplies the prompts
            for split, dataset in named_datasets(kwargs.get("train_dataset"), kwargs.get("eval_dataset")):
                check_prompts(dataset, split)
        self.reference = args.reference
        self.reward_temperature = args.reward_temperature
        # GRPO reads its `beta` as "keep a reference model and compute its log-probabilities". The sampler reference
        # needs neither. A model instance (not PEFT) would be reloaded from its hub id, which a model built in memory
        # has not: the reference is then a copy of it, taken now, while it is the initial policy.
        for each in (model, kwargs.get("ref_model")):
            drop_foreign_forward(each)
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
        if args.disable_dropout:
            # GRPO's disable_dropout_in_model misses functional attention dropout (see trl_nca.dropout)
            for each in (self.model, self.ref_model):
                if each is not None:
                    disable_dropout(each)
        elif has_active_dropout(self.model):
            logger.warning(
                "The policy has dropout and `disable_dropout=False`: the old and reference log-probabilities are "
                "forwards of their own with other dropout masks, so log pi_theta - log pi_ref is not 0 even before "
                "the first update. Set `disable_dropout=True` (OnlineNCAConfig's default) unless you want that."
            )
        self.reward_funcs = [
            # named: an exception inside a reward function names it, as in the command
            f if isinstance(f, torch.nn.Module) else checked_reward(named_reward(f), self.num_generations)
            for f in self.reward_funcs
        ]
        self._install_prompt_sharing(args.prompt_sharing)

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

    def _check_group_settings(self, args: OnlineNCAConfig, *, training: bool = True, evaluating: bool) -> None:
        if not self.needs_whole_groups:
            return
        settings = [(args.per_device_train_batch_size, args.num_generations, "train")] if training else []
        if evaluating:
            settings.append(
                (args.per_device_eval_batch_size, args.num_generations_eval or args.num_generations, "eval")
            )
        for batch_size, generations, which in settings:
            if batch_size % generations != 0:
                raise ValueError(
                    f"{self._name}'s log-softmax needs each group of completions whole in one loss computation: "
                    f"per_device_{which}_batch_size ({batch_size}) must be a multiple of the group size "
                    f"({generations}). OnlineNCATrainer has no such constraint."
                )

    # Extends Trainer.evaluate: the eval batch size is checked where an evaluation happens, not when none is planned
    def evaluate(self, eval_dataset=None, *args, **kwargs):
        self._check_group_settings(self.args, training=False, evaluating=True)
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            for split, dataset in named_datasets(None, eval_dataset):
                check_prompts(dataset, split)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def _prepare_reference(self, model):
        """The reference copy, set up as GRPOTrainer sets up its own (fused head, dropout, device, sharding)."""
        model.eval()  # a copy of a policy in training mode; GRPO's reference comes from from_pretrained, in eval
        if self.args.disable_dropout:
            disable_dropout(model)
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
        if self.environment_factories is None:  # rows of a stream (or given to evaluate) were not checked up front
            check_prompts(inputs, "train" if self.model.training else "eval")
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        # A completion counts in its group if some reward function scored it and it kept a token (GRPO masks
        # truncated completions when `mask_truncated_completions`)
        kept = self.accelerator.gather(output["completion_mask"].any(dim=1))
        groups = group_labels(
            self._rewards_per_func, self.reward_weights, kept, group_size, self.reward_temperature,
            self.reward_func_names,
        )  # fmt: skip
        if not bool(groups.valid.any()):
            unscored, masked = int((~groups.scored).sum()), int((groups.scored.flatten() & ~kept).sum())
            logger.warning(
                f"No completion of this {mode} generation batch can be trained on ({unscored} of "
                f"{groups.valid.numel()} unscored: every reward function returned None; {masked} masked: truncated, "
                "with `mask_truncated_completions=True`): the step's loss and gradient are 0."
            )
        rewards, valid = groups.rewards.flatten(), groups.valid.flatten()
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        first = self.accelerator.process_index * len(inputs)
        output.update(
            nca_rewards=rewards[local],
            nca_labels=groups.labels.flatten()[local].float(),
            nca_group_size=groups.sizes.flatten()[local],
            nca_valid=valid[local],
            nca_group=(torch.arange(first, first + len(inputs), device=rewards.device) // group_size),
        )
        self._metrics[mode]["frac_tied_groups"].append(groups.tied.float().mean())  # read by `log`
        self._log_completion_weights(output, groups.rewards, groups.labels, groups.valid)
        return output

    def _log_completion_weights(self, output, groups, labels, valid_groups) -> None:
        """The completions table's `advantage` column: the weight w_k of each completion in -dL/d r_k, the direction
        NCA (or InfoNCA) moves its implicit reward r_k = beta * (log pi_theta - log pi_ref), at generation time. With
        the sampler reference r = 0 then; with the initial reference r is known only where GRPO computed the
        policy's log-probabilities at generation (old_per_token_logps), and the column is NaN elsewhere."""
        model_rewards = torch.zeros_like(groups)
        if self.reference == "initial":
            old, ref = output.get("old_per_token_logps"), output.get("ref_per_token_logps")
            if old is None or ref is None:
                model_rewards = torch.full_like(groups, torch.nan)
            else:
                logratio = ((old - ref) * output["completion_mask"]).sum(1)
                model_rewards = self.nca_beta * self.accelerator.gather(logratio).view_as(groups).to(groups.dtype)
        with torch.enable_grad():
            model_rewards = model_rewards.detach().requires_grad_()
            loss = self._group_losses(model_rewards, labels.to(groups.dtype), groups, valid_groups).sum()
            (gradient,) = torch.autograd.grad(loss, model_rewards)
        weights = torch.where(valid_groups, -gradient, 0.0).flatten()
        for _ in range(min(len(weights), len(self._logs["advantages"]))):
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(weights.tolist())

    def _shuffles_groups(self) -> bool:
        return True  # always: InfoNCA's log-softmax needs whole groups, NCA's labels are per group

    # Extends GRPOTrainer._save_checkpoint (TRL 1.16.0): a checkpoint between two generations (steps_per_generation
    # above the accumulation steps, or num_iterations > 1) also holds the generated batch and the micro-step, which
    # GRPO loses (it regenerates on resume and trains on other completions than the uninterrupted run)
    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)  # written first, so a checkpoint with a trainer state has it
        state = {"step": self._step, "buffered_inputs": self._buffered_inputs}
        torch.save(state, os.path.join(folder, GENERATION_STATE.format(self.accelerator.process_index)))
        super()._save_checkpoint(model, trial)

    # Extends GRPOTrainer._load_optimizer_and_scheduler (TRL 1.16.0), which Trainer calls when it resumes
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, GENERATION_STATE.format(self.accelerator.process_index))
        if os.path.exists(path):
            state = torch.load(path, map_location=self.accelerator.device, weights_only=False)
            self._step, self._buffered_inputs = state["step"], state["buffered_inputs"]
            return
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        if self._step % (self.args.steps_per_generation * self.num_iterations) != 0:
            logger.warning(
                f"{checkpoint} was saved between two generations but holds no generation buffer ({path} is missing): "
                "the rest of that generation batch is generated again, so training differs from the uninterrupted "
                "run."
            )

    # Replaces GRPOTrainer._compute_loss (TRL 1.16.0)
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        per_token_logps, entropies, aux_loss = self._policy_forward(model, inputs)
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        if self.reference == "initial":
            ref_per_token_logps = inputs["ref_per_token_logps"]
        else:
            # The policy that sampled the group; when no update happened since (one update per generation, GRPO's
            # default), that is the current policy, whose log-probabilities GRPO then does not store
            ref_per_token_logps = inputs.get("old_per_token_logps")
            if ref_per_token_logps is None:
                ref_per_token_logps = per_token_logps.detach()
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # GRPO multiplies each token's loss by vLLM's sampler/trainer ratio (its modes and clipping, detached). A
            # completion's NCA term is a function of its summed log-probability, so here the ratio weights the
            # gradient of each token's log-probability instead (per token, or per completion in the sequence modes;
            # 0 drops it); the values, and so the logged loss, are unchanged
            ratio = inputs["importance_sampling_ratio"]
            per_token_logps = per_token_logps * ratio + per_token_logps.detach() * (1 - ratio)
        logps = (per_token_logps * mask).sum(dim=1)
        ref_logps = (ref_per_token_logps * mask).sum(dim=1)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        loss = self._group_loss(logps, ref_logps, inputs, group_size)
        # Trainer does not scale GRPO's loss for gradient accumulation (GRPO does it itself): the router loss too
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss = loss / normalizer
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean())
        self._log_step_metrics(mode, logps, ref_logps, entropies, mask, inputs)
        return loss

    def _policy_forward(self, model, inputs):
        """GRPO's forward of the policy on a batch, with the same arguments as GRPOTrainer._compute_loss gives it."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{name: inputs.get(name) for name in FORWARD_FIELDS},
        )

    def _group_loss(self, logps, ref_logps, inputs, group_size) -> torch.Tensor:
        """The loss of a micro-batch of completions, from their summed log-probabilities."""
        raise NotImplementedError

    def _group_losses(self, model_rewards, labels, rewards, valid) -> torch.Tensor:
        """`(G,)` losses of whole groups `(G, K)` from their implicit rewards r (for the completions table)."""
        raise NotImplementedError

    def _log_step_metrics(self, mode, logps, ref_logps, entropies, mask, inputs) -> None:
        """Appends the step's metrics to `self._metrics[mode]` as device tensors, as GRPO appends floats; `log` reads
        them at the next logging step (a read here would make the host wait for the device every micro-batch)."""
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
        sums = self.accelerator.reduce(sums.detach(), reduction="sum")
        self._metrics[mode]["entropy"].append(sums[0] / sums[1].clamp(min=1))
        self._metrics[mode]["logratio/mean"].append(sums[2] / sums[3].clamp(min=1))
        # a step where no completion has more than a uniform share does not count in the mean
        self._metrics[mode]["logratio/labelled"].append(IfDefined(sums[4] / sums[5], sums[5] > 0))

    # Extends GRPOTrainer.log (TRL 1.16.0): reads the device values our metrics appended once per logging step (one
    # `.tolist()` per dtype), into the numbers GRPOTrainer.log averages, those it logged when read every micro-batch
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        read_device_metrics(self._metrics["train" if self.model.training else "eval"])
        super().log(logs, start_time)


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

    def _group_losses(self, model_rewards, labels, rewards, valid):
        terms = nca_terms(model_rewards, labels, valid.sum(-1, keepdim=True).clamp(min=1))
        return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


class OnlineInfoNCATrainer(_OnlineKResponseTrainer):
    """Online InfoNCA: as [`OnlineNCATrainer`], with InfoNCA's K-way classification on each group.

    InfoNCA's log-softmax runs over a whole group, so `per_device_train_batch_size` (and the eval one, where there is
    an evaluation) must be a multiple of `num_generations`; groups are shuffled whole, so each micro-batch holds whole
    groups.
    """

    needs_whole_groups = True
    _tag_names = ["trl", "trl-nca", "infonca", "online"]
    _name = "OnlineInfoNCA"

    def _group_loss(self, logps, ref_logps, inputs, group_size):
        group = inputs["nca_group"]
        why = (
            "A micro-batch holds part of a group: InfoNCA needs whole groups (this is a bug of trl-nca, please report "
            "it with your settings)."
        )
        if len(group) % group_size:
            raise RuntimeError(why)
        # checked on the device: an accelerator raises it without the host waiting for the value (no sync)
        torch._assert_async((group.view(-1, group_size) == group[::group_size, None]).all(), why)

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

    def _group_losses(self, model_rewards, labels, rewards, valid):
        zero = torch.zeros_like(model_rewards)
        return infonca_loss(model_rewards, zero, rewards, valid, beta=1.0, reward_temperature=self.reward_temperature)
