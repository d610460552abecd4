"""Memory measured in a fresh process (not a test module): the peak resident memory of parts of a run.

    python tests/memory_job.py check OUT.json
    python tests/memory_job.py head OUT.json

`head`: the response-only LM head's forward and backward on 1,024 tokens at a vocabulary of 150,000 (the
log-probabilities, entropies and top-1 flags the trainers ask for, and the gradients of the hidden states and the
head's weight), first chunked as the trainers run it, then with the full logits at once; OUT.json gets the
high-water mark at the start, after the chunked head and after the full one (the full one raises it by its excess).

`check`: NCATrainer on a tiny Llama with a vocabulary of 150,000 (batch 4, K = 4, 48-token sequences: a prompt of 16
tokens, responses of 32), float32 on the CPU. One training step runs first (the layout check held back), then the
layout check alone; OUT.json gets the high-water mark of resident memory, in GB, at the start, after the step and
after the check (a check that needs more than the step raises it).
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import build_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import nca_args  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from trl_nca import NCATrainer  # noqa: E402
from trl_nca.layout_check import run_offline_check  # noqa: E402

VOCAB = 150_000


def peak_gb() -> float:
    """The high-water mark of this process's resident memory: VmHWM, which starts afresh at exec (ru_maxrss does not:
    Linux carries the parent's over, so a child of a large pytest process would read the parent's peak)."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / 2**20


def check(out: str) -> None:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    rows = [{"prompt_ids": tokens(16), "completion_ids": [tokens(32) for _ in range(4)], "rewards": list(range(4))}
            for _ in range(4)]  # fmt: skip
    trainer = NCATrainer(
        model=LlamaForCausalLM(config),
        args=nca_args(Path(tempfile.mkdtemp()), per_device_train_batch_size=4, prompt_sharing="off"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    record = {"start_gb": peak_gb()}
    trainer._layouts_checked = True  # held back: the step first
    trainer.train()
    record["step_gb"] = peak_gb()
    trainer._layouts_checked = False
    run_offline_check(trainer, trainer.model)
    record["check_gb"] = peak_gb()
    Path(out).write_text(json.dumps(record))


def head(out: str) -> None:
    from trl_nca.scoring import response_log_probs

    torch.manual_seed(0)
    tokens, hidden_size = 1024, 64
    lm_head = torch.nn.Linear(hidden_size, VOCAB, bias=False)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    labels = torch.randint(0, VOCAB, (tokens,))
    record = {"start_gb": peak_gb()}
    log_probs, entropy, _ = response_log_probs(hidden, lm_head, labels, token_stats=True)
    (log_probs.sum() + entropy.sum()).backward()  # the entropy's gradient is none: it comes back detached
    record["chunked_gb"] = peak_gb()
    chunked = log_probs.detach(), hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = lm_head.weight.grad = None
    full = torch.log_softmax(lm_head(hidden).float(), dim=-1)
    entropy = -(full.exp() * full).sum(-1).detach()
    full = full.gather(-1, labels[:, None]).squeeze(-1)
    (full.sum() + entropy.sum()).backward()
    record["full_gb"] = peak_gb()
    record["max_gap"] = max(
        float((a - b).abs().max()) for a, b in zip(chunked, (full.detach(), hidden.grad, lm_head.weight.grad))
    )
    Path(out).write_text(json.dumps(record))


if __name__ == "__main__":
    {"check": check, "head": head}[sys.argv[1]](*sys.argv[2:])
