"""Why a CPU training process keeps its peak resident memory after the tensors are freed (docs/layouts.md).

Three rounds of a step-like transient (300 float32 tensors of 6 MB, with a small tensor that survives every 50 of
them), then `malloc_trim(0)`; RSS printed after each round's allocation and after its free:

    python benchmarks/heap_retention.py                                 # glibc's defaults
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/heap_retention.py  # a fixed mmap threshold
"""

import ctypes
import os

import torch


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    print(f"start {rss_gb():.2f} GB")
    survivors = []
    for round_ in range(3):
        transient = []
        for i in range(300):
            transient.append(torch.randn(1024, 1536))  # 6 MB each: a step's activations
            if i % 50 == 0:
                survivors.append(torch.randn(64, 64))  # small tensors that outlive the step, between the large ones
        peak = rss_gb()
        del transient
        print(f"round {round_}: {peak:.2f} GB while held, {rss_gb():.2f} GB after the free")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"after malloc_trim(0): {rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
