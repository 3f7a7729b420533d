"""The precision plan: which dtype each kind of tensor lives in, decided in one place for every stage.

- ``fp32``: every weight in fp32, no autocast — the CPU's choice (without bf16 matrix units a CPU's bf16 matmuls
  are slower than fp32, and a tiny model loses measurably to the rounding).
- ``bf16``: the GPU's plan, on whatever device runs it (torch's CPU autocast runs it on a CPU): weights nobody
  trains — a frozen or 4-bit base's compute dtype, the reference, a reward model or judge that only scores — in
  bf16; every *trained* parameter in fp32 (full fine-tuning's master weights, LoRA adapters, the value head); the
  forward passes under bf16 autocast. Trained weights stay fp32 because an Adam step at a fine-tuning learning rate
  (1e-5 .. 2e-5) is far below a bf16 weight's spacing (7 stored mantissa bits: a weight of 0.05 moves in steps of
  ~2.4e-4), so in bf16 most updates would round to nothing.
- ``auto``: ``bf16`` on a GPU that has it, else ``fp32``.

A stage process sets its plan once (`use`, from `run.precision`, in `contract.start`); loaders and trainers read it
(`current`). This module imports torch only when asked for a dtype, so the flow can name the settings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

SETTINGS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Plan:
    name: str  # "fp32" or "bf16": what "auto" resolved to
    frozen: str  # dtype name of weights nobody trains
    autocast: str | None  # dtype name of the forward passes' autocast; None: no autocast
    trained: str = "float32"  # every trained parameter, whatever the plan

    def dtype(self, which: str = "frozen"):
        import torch

        return getattr(torch, getattr(self, which))

    def autocast_on(self, device):
        """The autocast context for forward passes on `device` (a no-op under the fp32 plan)."""
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, self.autocast))

    def trainer_arguments(self) -> dict[str, Any]:
        """Hugging Face TrainingArguments' precision flags: bf16 autocast under the bf16 plan (accelerate's
        mixed precision: fp32 master weights, bf16 forward), `use_cpu` on a machine without a GPU."""
        import torch

        return {"bf16": self.autocast == "bfloat16", "fp16": False, "use_cpu": not torch.cuda.is_available()}


def resolve(setting: str) -> Plan:
    """The plan `run.precision` names on this process's device."""
    if setting not in SETTINGS:
        raise ValueError(f"run.precision is {setting!r}; choose one of {SETTINGS}")
    if setting == "auto":
        import torch

        setting = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if setting == "bf16":
        return Plan("bf16", frozen="bfloat16", autocast="bfloat16")
    return Plan("fp32", frozen="float32", autocast=None)


_plan: Plan | None = None


def use(setting: str) -> Plan:
    """Make `setting` this process's plan (once per stage process, before any model loads)."""
    global _plan
    _plan = resolve(setting)
    return _plan


def current() -> Plan:
    """This process's plan: the one `use` set, else `auto`'s."""
    return _plan or resolve("auto")


def keep_trained_in_fp32(model) -> list[str]:
    """Cast every trained parameter of `model` that is not fp32 to fp32, before its optimizer exists; returns their
    names. TRL's trainers cast a QLoRA adapter to bf16 (the QLoRA paper's choice); the plan keeps it in fp32."""
    import torch

    moved = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            moved.append(name)
    return moved


def record(model, plan: Plan | None = None) -> dict[str, Any]:
    """What a trained model's numbers were kept in (the `precision` entry of each training stage's metrics): the
    plan, the dtypes of its trained parameters and of its frozen ones (4-bit weights show as uint8), and the
    autocast dtype of its forward passes (None: none)."""
    plan = plan or current()

    def names(trained: bool) -> list[str]:
        return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad == trained})

    return {"plan": plan.name, "trained": names(True), "frozen": names(False), "autocast": plan.autocast}
