"""The two ceilings GPU results are quoted against, measured on the card in the same run.

bf16 matrix product rate (8192^3, random data) and device-to-device copy bandwidth
(bytes read plus bytes written). Writes JSON to the path given (stdout without one).
"""

import json
import sys

import torch


def _time_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps


def measure() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b)
    src = torch.randn(2**30, device="cuda", dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src))
    return {
        "device_name": torch.cuda.get_device_name(),
        "bf16_matmul_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
        "copy_tb_per_s": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e12,
    }


if __name__ == "__main__":
    result = measure()
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    print(text)
