"""The built-in dialects, architectures and patch kinds, registered through the public hooks like any plugin."""
from __future__ import annotations

from typing import Callable

from lora_compat.hooks import hookimpl

from .archs import SD2, SD15, SDXL
from .archs.chroma import CHROMA
from .archs.flux import FLUX1
from .archs.flux2 import FLUX2
from .archs.nextdit import LUMINA2, Z_IMAGE
from .archs.qwen_image import QWEN_IMAGE
from .archs.sd3 import SD3
from .archs.wan import WAN
from .dialects.bfl import BflDialect
from .dialects.bfl_control import BflControlDialect
from .dialects.checkpoint import CheckpointRecogniser
from .dialects.control_lora import ControlLoraRecogniser
from .dialects.controlnet import ControlNetRecogniser
from .dialects.diffusers import DiffusersDialect
from .dialects.kohya import KohyaDialect
from .dialects.lycoris import LycorisDialect
from .dialects.native import NativeDialect
from .dialects.onetrainer import OneTrainerDialect
from .dialects.peft import PeftDialect
from .dialects.peft_lycoris import PeftLycorisDialect
from .dialects.peft_tuners import PeftTunerRecogniser
from .dialects.t2i_adapter import T2IAdapterRecogniser
from .dialects.textual_inversion import TextualInversionRecogniser
from .dialects.xlabs import XlabsDialect
from .patches import (BoftPatch, DoraPatch, FullPatch, GloraPatch, Ia3Patch, LohaPatch, LokrPatch, LoraPatch,
                      NormPatch, OftPatch, PeftBoftPatch, PeftIa3Patch, PeftOftPatch, SetPatch)


@hookimpl
def register_dialects(register: Callable[[object], None]) -> None:
    for dialect in (KohyaDialect(), LycorisDialect(), DiffusersDialect(), PeftDialect(), XlabsDialect(),
                    BflDialect(), OneTrainerDialect(), BflControlDialect(),
                    TextualInversionRecogniser(), CheckpointRecogniser(), ControlNetRecogniser(),
                    ControlLoraRecogniser(), T2IAdapterRecogniser(), PeftLycorisDialect(), PeftTunerRecogniser(),
                    NativeDialect()):
        register(dialect)


@hookimpl
def register_archs(register: Callable[[object], None]) -> None:
    for arch in (SD15, SD2, SDXL, FLUX1, WAN, FLUX2, QWEN_IMAGE, Z_IMAGE, LUMINA2, CHROMA, SD3):
        register(arch)


@hookimpl
def register_kinds(register: Callable[[object], None]) -> None:
    for kind in (LoraPatch, LohaPatch, LokrPatch, Ia3Patch, GloraPatch, OftPatch, BoftPatch, FullPatch, NormPatch,
                 SetPatch, DoraPatch, PeftOftPatch, PeftBoftPatch, PeftIa3Patch):
        register(kind)
