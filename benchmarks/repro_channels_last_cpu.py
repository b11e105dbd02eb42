"""Minimal reproduction: a torch CPU (oneDNN) heap corruption in a channels-last convolution
backward (issue 20, item 4).

The weight gradient of a 1 x 1 stride-2 convolution with few input channels (seen with 2 and 4;
8 and 16 did not crash) in channels-last layout on CPU writes out of bounds: the process aborts
with "double free or corruption", "free(): invalid next size" or a segmentation fault, at once or
a few calls later (``gdb`` puts the abort in ``mkldnn_convolution_backward_weights``). The same
call at stride 1, or in NCHW layout, is fine. Seen with torch 2.14.1+cu130 on CPU, 1 thread.

PC-DARTS's ``FactorizedReduce`` (the skip connection of a reduction edge: two 1 x 1 stride-2
convolutions on ``C / k`` partial channels, i.e. 2 or 4 channels at C=8, K=4) is exactly this
op, so the per-edge reference supernet in channels-last layout aborted in its first backward on
CPU (``benchmarks/search_step.py``'s ``reference_channels_last``). The library no longer reaches
it: on CPU in channels-last layout :class:`rarn.space.ops.FactorizedReduce` subsamples and runs
the convolution at stride 1 (the same maths), so ``search.channels_last`` stays safe on every
device (``tests/test_ops_channels_last.py``).

    python benchmarks/repro_channels_last_cpu.py [--mode aten|module|safe]

``aten`` (default): the bare op; ``module``: a channels-last ``nn.Conv2d(4, 2, 1, stride=2)``
forward + backward; ``safe``: the library's ``FactorizedReduce`` in channels-last layout (prints
``ok``). Expect the first two to kill the process (exit status 134 or 139): run it in a
subprocess.
"""

from __future__ import annotations

import argparse

import torch

CL = torch.channels_last


def aten(steps: int = 300) -> None:
    """``convolution_backward`` asking only for the weight gradient."""
    for _ in range(steps):
        x = torch.rand(32, 4, 32, 32).contiguous(memory_format=CL)
        w = torch.rand(2, 4, 1, 1).contiguous(memory_format=CL)
        grad_out = torch.rand(32, 2, 16, 16).contiguous(memory_format=CL)
        torch.ops.aten.convolution_backward(
            grad_out, x, w, [0], [2, 2], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
        )


def module(steps: int = 300) -> None:
    conv = torch.nn.Conv2d(4, 2, 1, stride=2, bias=False).to(memory_format=CL)
    for _ in range(steps):
        conv(torch.rand(32, 4, 32, 32).contiguous(memory_format=CL)).sum().backward()


def safe(steps: int = 300) -> None:
    from rarn.space.ops import FactorizedReduce

    op = FactorizedReduce(4, 4).to(memory_format=CL)
    for _ in range(steps):
        op(torch.rand(32, 4, 32, 32).contiguous(memory_format=CL)).square().sum().backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("aten", "module", "safe"), default="aten")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    {"aten": aten, "module": module, "safe": safe}[args.mode]()
    print("ok")


if __name__ == "__main__":
    main()
