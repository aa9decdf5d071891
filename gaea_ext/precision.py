"""Mixed precision for the search and training loops: autocast, loss scaling, memory layout.

bf16 needs no loss scaling (same exponent range as fp32). fp16 scales the weight loss with
torch's GradScaler; the architecture gradient is scaled by the same factor, and an
architecture step with a non-finite gradient is skipped on the device (the scaler adjusts on
the next weight step).
The fused kernels take half types, so the mixed ops run in the autocast dtype.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import List, Optional, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, amp: Optional[str], device: torch.device, channels_last: bool = False,
                 autocast_cache: bool = True):
        if amp is not None and amp not in DTYPES:
            raise ValueError(f"amp must be one of {', '.join(DTYPES)}, got {amp!r}")
        if amp is not None:
            _check_supported(amp, DTYPES[amp], device)
        self.amp, self.device = amp, device
        self.dtype = DTYPES.get(amp)
        self.channels_last = channels_last
        self.autocast_cache = autocast_cache  # False under CUDA-graph capture, which needs it off
        fp16 = amp == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16) if fp16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=self.autocast_cache)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, opt) -> None:
        if self.scaler:
            self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def grad(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Unscaled gradients of loss (None-safe, zeros for unused params). Under fp16 the loss
        is scaled by the scaler's scale and the gradients divided by it on the device: nothing
        is read on the host. An overflow leaves non-finite gradients, which the architecture
        step skips on the device (EG leaves such rows as they are; fused Adam gets found_inf)
        and counts."""
        scaled = self.scaler.scale(loss) if self.scaler else loss
        grads = torch.autograd.grad(scaled, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.scaler:
            grads = torch._foreach_div(grads, self.scaler._get_scale_async())
        return grads

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler else None

    def load_state_dict(self, state) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def _check_supported(amp: str, dtype: torch.dtype, device: torch.device) -> None:
    # Older torch only warns ("... not supported. Disabling autocast.") for an unsupported
    # device/dtype pair; a silently full-precision run would be mislabelled, so fail instead.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast(device.type, dtype=dtype):
                pass
    except (RuntimeError, AssertionError, ValueError, UserWarning) as e:
        raise ValueError(f"--amp {amp} is not supported on {device.type} by this torch: {e}") from None
