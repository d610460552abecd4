"""Host synchronisations (issue 21): a training micro-batch leaves its metrics on the device, and `log` reads them once
per logging step, into the values the trainers logged when they read them every micro-batch.

On an accelerator each read of a tensor's value on the host (`.item()`, `.tolist()`, `bool(t)`, `float(t)`, ...)
makes the host wait for the device's queue to drain. The tests count those calls by patching `torch.Tensor`, so they
run on the CPU, where the same calls are made."""

import collections
import contextlib
import doctest
import math
import os
import sys

import pytest
import torch
from conftest import build_model
from helpers import k_response_dataset, nca_args
from online_helpers import QUESTIONS, length_reward
from test_drop_in import tiny_moe
from test_online import build, scored_groups, sequence_logps
from test_online_paths import moe_trainer
from torch.utils._python_dispatch import TorchDispatchMode

import trl_nca
import trl_nca.metrics
from trl_nca import NCATrainer, OnlineInfoNCATrainer, OnlineNCATrainer
from trl_nca.metrics import k_response_metrics, token_metric_sums

PACKAGE = os.path.dirname(trl_nca.__file__)
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
# The functions that compute and store the training metrics, and the loss methods that call them
METRIC_PATH = {
    ("trainer.py", "compute_loss"),
    ("trainer.py", "_log_metrics"),
    ("online_trainer.py", "_compute_loss"),
    ("online_trainer.py", "_log_step_metrics"),
}
# The reads that remain in the offline loss path, outside the metrics, per micro-batch: `_sequence_logps` sizes its
# per-response sums with int(response_mask.sum()) (policy and reference forwards), and `soft_labels` takes its
# ordered-rows branch only where bool(ordered.any())
OFFLINE_REMAINING = {("trainer.py", "_sequence_logps"): 2, ("losses.py", "soft_labels"): 1}


@contextlib.contextmanager
def host_reads():
    """Count the calls that read a tensor's value on the host, by the (file, function) that made them."""
    reads = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            reads[(os.path.relpath(caller.co_filename, PACKAGE), caller.co_name)] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def device_copies():
    """Count the calls that copy to a device (`Tensor.to(device)`, `.cuda()`, `torch.tensor(..., device=)`), by
    the (file, function) that made them. On a GPU a copy from pageable memory blocks the host; the grouped forward's
    copies go through `group_forward._to_device` (pinned, non-blocking), which is where they should be found."""
    copies = collections.Counter()
    to, cuda, tensor = torch.Tensor.to, torch.Tensor.cuda, torch.tensor

    def names_a_device(args, kwargs):
        values = [*args, *kwargs.values()]
        return any(isinstance(v, (torch.device, str)) or isinstance(v, torch.Tensor) for v in values)

    def record():
        caller = sys._getframe(2).f_code
        copies[(os.path.relpath(caller.co_filename, PACKAGE), caller.co_name)] += 1

    def counted_to(self, *args, **kwargs):
        if names_a_device(args, kwargs):
            record()
        return to(self, *args, **kwargs)

    def counted_cuda(self, *args, **kwargs):
        record()
        return cuda(self, *args, **kwargs)

    def counted_tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            record()
        return tensor(*args, **kwargs)

    torch.Tensor.to, torch.Tensor.cuda, torch.tensor = counted_to, counted_cuda, counted_tensor
    try:
        yield copies
    finally:
        torch.Tensor.to, torch.Tensor.cuda, torch.tensor = to, cuda, tensor


# The aten ops that make the host wait for a GPU: a value read back (`_local_scalar_dense`: `item`, `bool`, `int`),
# or an output whose size depends on the values (a boolean mask's `nonzero`, under `x[mask]`, `x[mask] = v`,
# `masked_select`; `repeat_interleave` without `output_size`; `bincount`, `unique`)
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "bincount", "_unique2",
               "unique_dim", "unique_consecutive", "is_nonzero", "equal"}  # fmt: skip
# Functions that work on the host's tensors by design, before the batch goes to the device: the collators
HOST_SIDE = {"torch_call", "__call__", "per_response_values", "_row", "plan_calls", "scored_positions"}


class DeviceSyncs(TorchDispatchMode):
    """Counts, by the (file, function) under `root` (trl_nca) that called them, the aten ops that synchronise a GPU
    with the host, so that the count runs on the CPU: every op dispatched is looked at, also inside autograd's
    backward. Ops made inside the host-side collation (`HOST_SIDE`) and ops of code outside `root` (TRL's, torch's)
    are left out; ops of a model called from our code count as ours."""

    def __init__(self, root: str = PACKAGE):
        super().__init__()
        self.root, self.found = root, collections.Counter()

    @staticmethod
    def _syncs(func, args, kwargs) -> bool:
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            return True
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            return any(i is not None and i.dtype == torch.bool for i in args[1])
        if name == "repeat_interleave":
            return (kwargs or {}).get("output_size") is None and not (len(args) > 3 and args[3] is not None)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._syncs(func, args, kwargs):
            frame, site = sys._getframe(1), None
            while frame is not None:
                path = frame.f_code.co_filename
                if path.startswith(self.root):
                    if frame.f_code.co_name in HOST_SIDE:
                        site = None
                        break
                    site = site or (os.path.relpath(path, self.root), frame.f_code.co_name)
                frame = frame.f_back
            if site is not None:
                self.found[site] += 1
        return func(*args, **(kwargs or {}))


def _some_syncs(x):
    lengths = torch.tensor([1, 2, 3])
    selected = x[x > 2]  # a boolean mask: its size comes from the device
    counted = torch.repeat_interleave(torch.arange(3), lengths)
    sized = torch.repeat_interleave(torch.arange(3), lengths, output_size=6)  # the size given: no sync
    gathered = x[torch.tensor([0, 2])]  # indices: no sync
    selected.sum().backward()
    return float(x.detach().sum()), counted, sized, gathered


def test_the_sync_counter_sees_what_a_gpu_would_wait_for():
    x = torch.arange(6.0, requires_grad=True)
    with DeviceSyncs(root=os.path.dirname(__file__)) as syncs:
        _some_syncs(x)
    # x[mask] and its backward (an index_put by the same mask), the unsized repeat_interleave, the float read; not
    # the sized one nor the gather by indices
    assert syncs.found == {("test_host_syncs.py", "_some_syncs"): 4}


# Functions that convert the host copy `group_forward._on_host` made (one read of the device, counted there): the
# counter cannot tell a host tensor from a device one on this CPU
HOST_COPY_READS = {("group_forward.py", "group_host_rows"), ("group_forward.py", "plan_micro_batches")}


def ours(reads) -> dict:
    """The reads made by trl_nca's code (not by the model's or by TRL's), less the conversions of host copies."""
    return {site: n for site, n in reads.items() if not site[0].startswith("..") and site not in HOST_COPY_READS}


def offline_trainer(tokenizer, tmp_path, prompt_sharing):
    # Rows 0-3 hold a pair (K = 2: DPO's keys are defined), rows 4-7 none
    data = k_response_dataset(counts=(4, 3, 4, 2, 3, 4, 3, 4))
    trainer = NCATrainer(
        model=build_model(tokenizer),
        args=nca_args(tmp_path, prompt_sharing=prompt_sharing),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


def offline_batch(trainer, rows):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in rows]))


@pytest.mark.parametrize("prompt_sharing", ["off", "mask"])
def test_an_offline_micro_batch_reads_no_metric_on_the_host(prompt_sharing, tokenizer, tmp_path):
    trainer = offline_trainer(tokenizer, tmp_path, prompt_sharing)
    batches = [offline_batch(trainer, range(0, 4)), offline_batch(trainer, range(4, 8))]
    with host_reads() as reads:
        for batch in batches:
            trainer.compute_loss(trainer.model, batch)
    reads = ours(reads)
    assert {site: reads[site] for site in METRIC_PATH if site in reads} == {}
    assert not any(file == "metrics.py" for file, _ in reads), reads
    per_micro_batch = {site: count / len(batches) for site, count in reads.items()}
    assert per_micro_batch == OFFLINE_REMAINING


@pytest.mark.parametrize("cls", [OnlineNCATrainer, OnlineInfoNCATrainer])
def test_an_online_micro_batch_reads_no_metric_on_the_host(cls, tokenizer, tmp_path):
    """Only the metrics are counted: the policy forward's own reads belong to the layouts it runs through."""
    trainer = build(cls, tokenizer, tmp_path)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = scored_groups(trainer)  # generation and scoring read the device once per generation batch, not here
    with host_reads() as reads:
        for _ in range(3):
            trainer.compute_loss(trainer.model, batch)
    reads = ours(reads)
    assert {site: reads[site] for site in METRIC_PATH if site in reads} == {}
    assert not any(file == "metrics.py" for file, _ in reads), reads


def test_docstring_examples():
    result = doctest.testmod(trl_nca.metrics)
    assert result.attempted > 0 and result.failed == 0


def slow_token_sums(entropy, is_top1, owner, rewards, response_mask):
    """`token_metric_sums` with loops: each row's best response is its first highest reward."""
    flat, best_responses = 0, set()
    for row_rewards, row_mask in zip(rewards.tolist(), response_mask.tolist()):
        real = [k for k, is_real in enumerate(row_mask) if is_real]
        if real:
            top = max(row_rewards[k] for k in real)
            best_responses.add(flat + next(i for i, k in enumerate(real) if row_rewards[k] == top))
        flat += len(real)
    best = torch.tensor([int(o) in best_responses for o in owner.tolist()], dtype=torch.bool)
    return torch.stack(
        [
            entropy.sum(),
            torch.tensor(float(len(entropy))),
            (is_top1.bool() & best).sum().float(),
            best.sum().float(),
        ]
    )


def test_token_metric_sums_against_a_slow_reference():
    torch.manual_seed(0)
    # ragged K, a tie for the top reward, and a row without any response
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.5, 0.1, 0.9, 0.2]])
    owner = torch.arange(int(response_mask.sum())).repeat_interleave(torch.tensor([2, 3, 1, 4, 2, 1, 3, 2, 2]))
    entropy, is_top1 = torch.rand(len(owner)), torch.rand(len(owner)) > 0.5
    with host_reads() as reads:
        got = token_metric_sums(entropy, is_top1, owner, rewards, response_mask)
    assert reads == {}
    torch.testing.assert_close(got, slow_token_sums(entropy, is_top1, owner, rewards, response_mask))


def old_offline_step(trainer, batch) -> dict:
    """What one training micro-batch appended before issue 21 (read at once), the metrics from the trainer's
    log-probabilities and head outputs, the token sums from `slow_token_sums`."""
    mask = batch["response_mask"]
    with torch.no_grad():
        flat, outputs, owner = trainer._sequence_logps(trainer.model, batch, token_stats=True)
        policy = trainer._per_response(flat, mask).float()
        ref = trainer.compute_ref_log_probs(trainer.ref_model, batch).float()
    metrics = k_response_metrics(policy, ref, batch["rewards"], mask, beta=trainer.beta, ordered=batch["ordered"])
    step = {key: column.nanmean().item() for key, column in metrics.items() if not column.isnan().all()}
    sums = slow_token_sums(outputs.entropy, outputs.is_top1, owner, batch["rewards"], mask)
    step["entropy"] = (sums[0] / sums[1].clamp(min=1)).item()
    step["mean_token_accuracy"] = (sums[2] / sums[3].clamp(min=1)).item()
    return step


def mean_of_steps(steps) -> dict:
    """DPOTrainer.log's average of the values each step appended (a step that left a key out does not count)."""
    keys = {key for step in steps for key in step}
    return {key: sum(s[key] for s in steps if key in s) / sum(key in s for s in steps) for key in keys}


@pytest.mark.parametrize("prompt_sharing", ["off", "mask"])
def test_offline_log_reads_the_device_once_into_the_old_per_step_means(prompt_sharing, tokenizer, tmp_path):
    trainer = offline_trainer(tokenizer, tmp_path, prompt_sharing)
    paired, unpaired = offline_batch(trainer, range(0, 4)), offline_batch(trainer, range(4, 8))
    expected = mean_of_steps([old_offline_step(trainer, paired), old_offline_step(trainer, unpaired)])
    assert "rewards/chosen" in expected and "rewards/chosen" not in old_offline_step(trainer, unpaired)
    for batch in (paired, unpaired):
        trainer.compute_loss(trainer.model, batch)
    with host_reads() as reads:
        trainer.log({"loss": 0.0})
    # one read per device and dtype: the float32 metrics and the int64 token count
    assert ours(reads) == {("metrics.py", "read_device_metrics"): 2}
    logged = trainer.state.log_history[-1]
    assert set(logged) - {"loss", "num_tokens", "epoch", "step"} == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert logged["num_tokens"] == int(paired["num_tokens"]) + int(unpaired["num_tokens"])

    # a logging window whose steps all leave a metric undefined does not log it (nor NaN); the tokens keep counting
    trainer.compute_loss(trainer.model, unpaired)
    trainer.log({"loss": 0.0})
    logged = trainer.state.log_history[-1]
    assert "rewards/chosen" not in logged and "logps/rejected" not in logged
    assert logged["num_tokens"] == int(paired["num_tokens"]) + 2 * int(unpaired["num_tokens"])


def entropy_of(model, batch) -> float:
    """Mean entropy (float64) of the policy's next-token distribution over the completion tokens of a batch."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
    log_p = torch.log_softmax(logits[:, -batch["completion_ids"].size(1) :], -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    mask = batch["completion_mask"]
    return ((entropy * mask).sum() / mask.sum()).item()


def old_online_step(trainer, batch) -> dict:
    """What one training micro-batch appended before issue 21, from float64 forwards of the policy and reference."""
    with torch.no_grad():
        logratio = sequence_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            logratio -= sequence_logps(trainer.model, batch)
        entropy = entropy_of(trainer.model, batch)
    valid = batch["nca_valid"]
    above = valid & (batch["nca_labels"] > 1.0 / batch["nca_group_size"])
    step = {"entropy": entropy, "logratio/mean": logratio[valid].mean().item()}
    if above.any():
        step["logratio/labelled"] = logratio[above].mean().item()
    return step


def ties_on_the_first_question(prompts, completions, **kwargs):
    """`length_reward`, constant over the group of the first question (a tied group)."""
    rewards = length_reward(prompts, completions)
    return [1.0 if prompt[-1]["content"] == QUESTIONS[0] else r for prompt, r in zip(prompts, rewards)]


def tied_fraction(trainer, batch) -> float:
    groups = batch["nca_rewards"].view(-1, trainer.num_generations)
    return (groups == groups[:, :1]).all(-1).double().mean().item()


def test_online_log_reads_the_device_once_into_the_old_per_step_means(tokenizer, tmp_path):
    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=ties_on_the_first_question, reference="initial")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    first, second = scored_groups(trainer, (0, 1)), scored_groups(trainer, (2, 3))
    assert tied_fraction(trainer, first) == 0.5 and tied_fraction(trainer, second) < 0.5
    # uniform labels on the second step: no completion is labelled above its share, `logratio/labelled` undefined
    second["nca_labels"] = torch.full_like(second["nca_labels"], 1.0 / trainer.num_generations)
    steps = [old_online_step(trainer, first), old_online_step(trainer, second)]
    assert "logratio/labelled" in steps[0] and "logratio/labelled" not in steps[1]
    expected = mean_of_steps(steps)
    expected["frac_tied_groups"] = (tied_fraction(trainer, first) + tied_fraction(trainer, second)) / 2
    for batch in (first, second):
        trainer.compute_loss(trainer.model, batch)
    with host_reads() as reads:
        trainer.log({"loss": 0.0})
    assert ours(reads) == {("metrics.py", "read_device_metrics"): 1}  # the float32 metrics, in one read
    logged = trainer.state.log_history[-1]
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert math.isfinite(logged["logratio/labelled"]) and abs(logged["logratio/mean"]) > 1e-3  # not the trivial case


def test_offline_router_loss_is_logged_from_the_device(tokenizer, tmp_path):
    trainer = NCATrainer(
        model=tiny_moe(tokenizer, 0),
        args=nca_args(tmp_path, prompt_sharing="off"),
        train_dataset=k_response_dataset(counts=(3, 2, 4, 2)),
        processing_class=tokenizer,
    )
    trainer.model.train()
    assert trainer.aux_loss_enabled
    batches = [offline_batch(trainer, [0, 1]), offline_batch(trainer, [2, 3])]
    with torch.no_grad():  # the model's own load-balancing loss, from a plain forward
        expected = [
            trainer.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
            ).aux_loss.item()
            for batch in batches
        ]
    with host_reads() as reads:
        for batch in batches:
            trainer.compute_loss(trainer.model, batch)
    assert ("trainer.py", "compute_loss") not in reads
    trainer.log({"loss": 0.0})
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_online_router_loss_is_logged_from_the_device(tokenizer, tmp_path):
    trainer = moe_trainer(tokenizer, tmp_path)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = scored_groups(trainer)
    with host_reads() as reads, torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, batch) for _ in range(2)]
    assert ("online_trainer.py", "_compute_loss") not in reads
    trainer.log({"loss": 0.0})
    # sampler reference: the NCA loss is 2 log 2 per group, the rest router_aux_loss_coef (0.5) x the router loss
    expected = [(loss.item() - 2 * math.log(2)) / 0.5 for loss in losses]
    assert trainer.state.log_history[-1]["aux_loss"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert expected[0] > 0.1


def test_infonca_checks_whole_groups_on_the_device():
    """The whole-group check of InfoNCA's loss reads nothing on the host (an async assert on the device), and still
    stops a micro-batch that holds part of a group."""
    trainer = object.__new__(OnlineInfoNCATrainer)
    trainer.nca_beta, trainer.reward_temperature = 0.1, 1.0
    logps = torch.randn(6, requires_grad=True)
    inputs = {
        "nca_rewards": torch.tensor([1.0, 0.0, 0.5, 0.2, 0.1, 1.0]),
        "nca_valid": torch.ones(6, dtype=torch.bool),
        "nca_group": torch.tensor([4, 4, 4, 9, 9, 9]),
    }
    with host_reads() as reads:
        trainer._group_loss(logps, logps.detach(), inputs, 3)
    assert ("online_trainer.py", "_group_loss") not in ours(reads)
    inputs["nca_group"] = torch.tensor([4, 4, 9, 9, 9, 4])
    with pytest.raises(RuntimeError, match="A micro-batch holds part of a group"):
        trainer._group_loss(logps, logps.detach(), inputs, 3)


@pytest.mark.parametrize("prompt_sharing", ["mask", "cache"])
def test_an_online_forward_reads_the_device_once_whatever_k_and_rows(prompt_sharing, tokenizer, tmp_path):
    """A grouped forward given no plan (`_prepare_inputs` makes one per generation, below) reads GRPO's ids and mask
    once (to find the groups); the layouts' plans are made on the
    host (the cache layout's `CachePlan`), so the reads do not grow with rows or K. The first forward also runs the
    layout check once, against GRPO's own forward."""
    from test_group_forward import build as build_online
    from test_group_forward import forward_inputs

    counts = {}
    for groups, k in [(1, 4), (2, 4), (4, 2), (2, 8)]:
        trainer = build_online(OnlineNCATrainer, tokenizer, tmp_path / f"{groups}x{k}", prompt_sharing,
                               num_generations=k, per_device_train_batch_size=groups * k)  # fmt: skip
        trainer.model.train()
        batch = scored_groups_of(trainer, groups, k)
        ids, mask, keep = forward_inputs(batch)
        for call in ("first", "later"):
            with host_reads() as reads, device_copies() as copies:
                trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, compute_entropy=True)
            counts[(groups, k, call)] = ours(reads), ours(copies)
    for (groups, k, call), (reads, copies) in counts.items():
        expected = {("group_forward.py", "_on_host"): 1}
        if call == "first":
            expected[("layout_check.py", "token_mismatch")] = 1  # the layout check, once, before any layout runs
        assert reads == expected, (groups, k, call)
        if call == "later":  # every copy from the host goes through the pinned, non-blocking `_to_device`;
            # `response_log_probs` moves the model's hidden states to the head's device (device to device, a no-op
            # on one GPU), which the count cannot tell from a host copy on this CPU
            assert set(copies) - {("scoring.py", "response_log_probs")} == {("group_forward.py", "_to_device")}


def scored_groups_of(trainer, groups, k):
    rows = [trainer.train_dataset[i % len(trainer.train_dataset)] for i in range(groups) for _ in range(k)]
    return trainer._generate_and_score_completions(rows)


@pytest.mark.parametrize("cls", [OnlineNCATrainer, OnlineInfoNCATrainer])
@pytest.mark.parametrize("prompt_sharing", ["mask", "cache"])
def test_an_online_micro_batch_makes_no_device_sync_of_its_own(cls, prompt_sharing, tokenizer, tmp_path):
    """A training micro-batch (the grouped policy forward, the loss, its backward) runs no op that makes a GPU wait
    for the host in trl_nca's code: the scored positions come from the host as indices, the prompt-cache plan and
    its sizes too. The grouped forward's one copy of the rows to the host (`_on_host`, counted above) is the only
    one."""
    from test_group_forward import build as build_online

    trainer = build_online(cls, tokenizer, tmp_path, prompt_sharing, num_generations=4, per_device_train_batch_size=8)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = scored_groups_of(trainer, 2, 4)
    trainer.compute_loss(trainer.model, batch)  # the first forward also runs the layout check, once
    with DeviceSyncs() as syncs:
        trainer.compute_loss(trainer.model, batch).backward()
    assert dict(syncs.found) == {}
    # the same count on the old way of picking the scored tokens (a boolean mask) finds its syncs
    if prompt_sharing == "mask":
        from trl_nca import group_forward

        original = group_forward.scored_positions
        try:
            group_forward.scored_positions = lambda mask: None
            with DeviceSyncs() as syncs:
                trainer.compute_loss(trainer.model, batch).backward()
        finally:
            group_forward.scored_positions = original
        assert sum(syncs.found.values()) >= 3, syncs.found


@pytest.mark.parametrize("cls", [OnlineNCATrainer, OnlineInfoNCATrainer])
def test_grouping_once_per_generation_leaves_the_micro_batches_no_read(cls, tokenizer, tmp_path):
    """GRPO's schedule (4 micro-batches per generation, 2 iterations): `_prepare_inputs` copies every micro-batch of a
    generation to the host in one read, and the policy forwards of all 8 micro-batches read nothing (the first
    forward's layout check apart); the old-log-probability forward reads once for its 4 chunks; the log-probabilities
    are those of the forward that reads by itself, and a plan given other rows stops the forward."""
    from test_group_forward import build as build_online

    from trl_nca.group_forward import PromptSharingMixin

    trainer = build_online(cls, tokenizer, tmp_path, "mask", num_generations=4, per_device_train_batch_size=4,
                           steps_per_generation=4, num_iterations=2)  # fmt: skip
    trainer.model.train()
    rows = [trainer.train_dataset[i // 4] for i in range(16)]
    reads_per_call = []
    for _ in range(8):
        with host_reads() as reads:
            inputs = trainer._prepare_inputs(rows)
        generation_reads = ours(reads).get(("group_forward.py", "_on_host"), 0)
        assert trainer._next_plan is not None
        with host_reads() as reads:
            logps = trainer._policy_forward(trainer.model, inputs)[0]
        reads_per_call.append((generation_reads, {k: v for k, v in ours(reads).items() if k[1] != "token_mismatch"}))
        unplanned = PromptSharingMixin._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1),
        )[0]  # fmt: skip
        mask = inputs["completion_mask"].bool()
        torch.testing.assert_close(logps[mask], unplanned[mask], rtol=1e-6, atol=1e-6)
        trainer._step += 1
    # the generation: the old-log-probability forward (one call for the 16 rows, 4 chunks) and the plans, a read each
    assert [r for r, _ in reads_per_call] == [2, 0, 0, 0, 0, 0, 0, 0]
    assert all(forward == {} for _, forward in reads_per_call)  # none in any micro-batch's forward
    trainer._prepare_inputs(rows)
    other = trainer._buffered_inputs[(trainer._step + 1) % 4]
    with pytest.raises(RuntimeError, match="other rows than the micro-batch its plan was made for"):
        trainer._policy_forward(trainer.model, other)
