"""The generated LoRA library of the library tests and ``bench/bench_library.py``: a dozen topics with their
titles, triggers and tags, labelled queries and paraphrases, and small full-size-shaped LoRA files per base with
the topic's metadata in one of four places (kohya metadata, modelspec, a webui ``.json`` sidecar, a Civitai
``.civitai.info``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_compat import plugins

TOPICS = {
    "watercolor": ("watercolor painting", ["wc_style"], ["watercolor", "soft edges", "paper texture"]),
    "cyberpunk": ("cyberpunk neon city", ["cyb3rpunk"], ["neon lights", "cyberpunk", "night city"]),
    "pixelart": ("pixel art sprite", ["pixel_art"], ["pixel art", "8-bit", "sprite"]),
    "oilpaint": ("oil painting portrait", ["oilpnt"], ["oil painting", "impasto", "canvas"]),
    "steampunk": ("steampunk machinery", ["steamp"], ["steampunk", "brass gears", "victorian"]),
    "ghibli": ("anime landscape studio", ["ghbli"], ["anime landscape", "clouds", "green hills"]),
    "lineart": ("ink line art sketch", ["lineart_ink"], ["line art", "monochrome", "sketch"]),
    "lowpoly": ("low poly 3d render", ["lowp0ly"], ["low poly", "3d render", "polygons"]),
    "claymation": ("clay figure stop motion", ["clayfig"], ["claymation", "plasticine", "stop motion"]),
    "vaporwave": ("vaporwave retro aesthetic", ["vpwave"], ["vaporwave", "pink sunset", "retro grid"]),
    "knight": ("armored knight character", ["sir_knight"], ["knight", "plate armor", "sword"]),
    "cat": ("fluffy cat character", ["mochi_cat"], ["cat", "fluffy fur", "whiskers"]),
}
QUERIES = {
    "watercolor": "a watercolor painting of a harbor", "cyberpunk": "a street at night with neon lights, cyberpunk",
    "pixelart": "8-bit pixel art sprite of a hero", "oilpaint": "impasto oil painting portrait of a man",
    "steampunk": "steampunk airship with brass gears", "ghibli": "green hills and clouds anime landscape",
    "lineart": "monochrome line art sketch of a bird", "lowpoly": "low poly 3d render of a fox",
    "claymation": "claymation plasticine figure", "vaporwave": "vaporwave pink sunset retro grid",
    "knight": "a knight in plate armor holding a sword", "cat": "a fluffy cat with long whiskers",
}
BASES = ("sd15", "sdxl", "flux1")


def _modules(base: str, count: int = 4) -> dict[str, tuple[int, ...]]:
    """A few full-size target modules of the base (enough for its shapes to decide the base)."""
    index = plugins.archs()[base].index
    if base == "flux1":  # FLUX.1's width is 3072; img_attn.qkv stacks q, k and v by rows (dialects.md §5.1)
        return {f"double_blocks.{i}.img_attn.qkv": (3 * 3072, 3072) for i in range(count)}
    unet = index.components["unet"]
    names = [p for p in unet if p.endswith(("attn2.to_k", "attn1.to_q")) and "transformer_blocks" in p]
    return {p: unet[p]["weight"] for p in names[:count]}


def write_lora(path: Path, base: str, topic: str, variant: int) -> None:
    g = torch.Generator().manual_seed(variant)
    tensors, metadata = {}, {}
    for module, (out, inner) in _modules(base).items():
        down, up = torch.randn(1, inner, generator=g).half(), torch.randn(out, 1, generator=g).half()
        if base == "flux1":
            key = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        elif base == "sdxl":
            tensors.update({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up})
        else:
            key = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(1.0).half()})
    title, triggers, tags = TOPICS[topic]
    source = variant % 4
    if source == 0:
        metadata["ss_tag_frequency"] = json.dumps({f"10_{topic}": {t: 50 - i for i, t in enumerate(tags)}})
        metadata["ss_output_name"] = f"{topic}_v{variant}"
    elif source == 1:
        metadata["modelspec.trigger_phrase"] = ", ".join(triggers)
        metadata["modelspec.title"] = title
    save_file(tensors, str(path), metadata=metadata)
    if source == 2:
        path.with_suffix(".json").write_text(json.dumps({"activation text": ", ".join(triggers),
                                                         "preferred weight": 0.65, "description": title}))
    elif source == 3:
        path.with_suffix(".civitai.info").write_text(json.dumps({
            "trainedWords": triggers, "baseModel": {"sd15": "SD 1.5", "sdxl": "SDXL 1.0", "flux1": "Flux.1 D"}[base],
            "model": {"name": title}, "images": [{"meta": {"prompt": f"{tags[0]}, {tags[1]}, masterpiece"}}]}))


#: paraphrases that share no word with their LoRA's triggers, tags, title or file name (test_library.py checks)
PARAPHRASES = {
    "cat": "a sleepy kitten curled on a sofa",
    "knight": "medieval warrior wearing shining metal protection",
    "cyberpunk": "futuristic metropolis glowing with electric signage after dark",
    "steampunk": "copper cogs and steam powered contraptions",
    "claymation": "animated figurines sculpted from modeling dough",
    "ghibli": "hand drawn japanese animation countryside with meadows",
}
