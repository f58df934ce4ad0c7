"""Where a SAIL run keeps its policies: whole UNets (each stage trains a copy and saves it), or LoRA
adapters on the one base UNet (``train.lora``; ``sail_fast.diffusion.lora``), so the base, the policy and any
earlier policy are adapter states of a single UNet instead of UNets of their own."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from ..diffusion.lora import POLICY, AdapterView, adapter_state, add_policy_adapter, load_adapter, save_adapter
from ..diffusion.stack import load_unet
from ..runs.layout import DONE
from ..runs.readback import check_run_weights
from ..runs.run_folder import write_manifest


class Policies:
    def __init__(self, unet: nn.Module, lora=None, seed: int = 0) -> None:
        """``unet``: the base model (frozen here); ``lora``: ``train.lora`` (None: full fine-tuning)."""
        self.lora = lora is not None
        self.unet = unet.eval().requires_grad_(False)
        if self.lora:
            add_policy_adapter(self.unet, lora, seed=seed)
        self.base = AdapterView(self.unet, None) if self.lora else self.unet

    @property
    def folder(self) -> str:
        """The folder of a stage's ``final/`` that holds its policy."""
        return "lora" if self.lora else "unet"

    def fresh(self) -> nn.Module:
        """The policy iter0 starts from: the base (a copy of it; with LoRA, the adapter as peft made it)."""
        return AdapterView(self.unet, POLICY) if self.lora else copy.deepcopy(self.base).requires_grad_(True)

    def trainable(self, policy: nn.Module) -> nn.Module:
        """``policy`` ready to hand to the trainer (which picks the adapter's weights itself under LoRA)."""
        return policy if self.lora else policy.requires_grad_(True)

    def load(self, folder: str | Path, role: str = POLICY) -> nn.Module:
        """The policy saved in ``folder`` (a stage's ``final/unet`` or ``final/lora``), as adapter ``role``
        of the shared UNet under LoRA (``policy``, or ``previous`` for a frozen earlier one)."""
        if not self.lora:
            return self.load_whole(folder)
        self._check(folder)
        load_adapter(self.unet, folder, role)
        self.unet.eval()
        return AdapterView(self.unet, role)

    def load_whole(self, folder: str | Path) -> nn.Module:
        """A whole UNet saved in ``folder`` (any full fine-tune's policy, or a soup, which is whole even under LoRA)."""
        self._check(folder)
        return load_unet(folder, self.unet)

    @staticmethod
    def _check(folder: str | Path) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(missing_policy(Path(folder)))
        check_run_weights(folder)  # bytes changed since the stage wrote them, or unrecorded: refused, never trained on

    def save_fresh(self, final: Path) -> None:
        """Write the policy iter0 would start from as ``final``'s policy (``sail.iter0_steps: 0``)."""
        folder = Path(final) / self.folder
        if not self.lora:
            self.base.save_pretrained(folder)
        else:
            save_adapter(folder, adapter_state(self.unet, POLICY), self.unet)
        write_manifest(final)


def missing_policy(folder: Path) -> str:
    """What to do about a stage's policy folder that is gone: a stage marked done (its done.json, two or three
    levels up: ``iter0/final/unet``, ``round-01/train/final/unet``) is trained again once its folder goes."""
    done = next((stage / DONE for stage in list(folder.parents)[1:3] if (stage / DONE).is_file()), None)
    if done is None:
        return f"{folder} is missing"
    return (
        f"{folder} is missing, though its stage is marked done ({done}); to train that stage again, delete "
        f"{done.parent} and every later stage's folder, then rerun with --resume"
    )
