"""FactorizedReduce in channels-last layout on CPU: no oneDNN heap corruption, same results.

Run in a subprocess: without the workaround in :class:`rarn.space.ops.FactorizedReduce` the torch
bug (``benchmarks/repro_channels_last_cpu.py``) kills the process instead of failing a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
import torch
from rarn.space.ops import FactorizedReduce
torch.set_num_threads(1)
torch.manual_seed(0)
CL = torch.channels_last
for dtype in (torch.float32, torch.float64):  # float32: oneDNN's path; float64: exact maths
    for side in (16, 15):
        ref = FactorizedReduce(4, 4).to(dtype)
        cl = FactorizedReduce(4, 4).to(dtype)
        cl.load_state_dict(ref.state_dict())
        cl = cl.to(memory_format=CL)
        for _ in range(20 if dtype == torch.float32 else 1):
            x = torch.randn(8, 4, side, side, dtype=dtype)
            a, b = ref(x), cl(x.contiguous(memory_format=CL))
            assert b.is_contiguous(memory_format=CL)
            assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
            a.square().sum().backward()
            b.square().sum().backward()
        if dtype == torch.float64:
            for p, q in zip(ref.parameters(), cl.parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-10)
print("ok")
"""


def test_factorized_reduce_channels_last_on_cpu_is_safe_and_exact():
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
