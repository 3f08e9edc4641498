"""Third-party plugins: a module registered at run time and a package found through its entry point."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plugin_dist import install_plugin
import lora_compat
from lora_compat import plugins
from lora_compat.dialects.kohya import KohyaDialect
from lora_compat.hooks import hookimpl

PLUGIN_SOURCE = '''
"""A made-up dialect: keys "acme/<component>/<module path>/up|down", scale 1."""
from lora_compat.dialects import Dialect, Match
from lora_compat.hooks import hookimpl
from lora_compat.patches import LoraPatch, Ref
from lora_compat.patchset import PatchSet


class AcmeDialect(Dialect):
    id = "acme"
    description = "ACME trainer LoRAs"

    def detect(self, header):
        keys = list(header.keys())
        if keys and all(k.startswith("acme/") for k in keys):
            return Match(self.id, 1.0, ("acme/ keys",))
        return None

    def read(self, file, index):
        result = PatchSet(source=file.header.display_name, dialect=self.id, metadata=file.metadata)
        modules = {k.rsplit("/", 1)[0] for k in file.keys()}
        for module in sorted(modules):
            _, component, path = module.split("/")
            found = index.resolve(f"{component}.{path}")
            if found is None:
                result.unmatched[module + "/up"] = "no such module"
                continue
            up, down = (Ref(file.shapes[f"{module}/{r}"], (lambda k=f"{module}/{r}": file.tensor(k)), f"{module}/{r}")
                        for r in ("up", "down"))
            result.patches[f"{found[0]}.{found[1]}"] = LoraPatch(up, down)
        return result


@hookimpl
def register_dialects(register):
    register(AcmeDialect())
'''


def write_acme_file(path: Path, up: torch.Tensor, down: torch.Tensor) -> Path:
    target = "acme/unet/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{target}/up": up.contiguous(), f"{target}/down": down.contiguous()}, str(path))
    return path


def test_module_plugin_adds_a_dialect_that_is_detected_read_and_applied(tmp_path, monkeypatch):
    from lora_compat.oracles.models import make_sd15_components

    module_path = tmp_path / "acme_plugin.py"
    module_path.write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import acme_plugin

    plugins.register_plugin(acme_plugin, name="acme-plugin")
    try:
        assert plugins.registry().dialects["acme"].plugin == "acme-plugin"
        up, down = torch.randn(8, 2), torch.randn(2, 8)
        path = write_acme_file(tmp_path / "style.safetensors", up, down)
        assert lora_compat.inspect(path).dialect == "acme"
        patchset = lora_compat.read(path)
        assert list(patchset) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]

        components = make_sd15_components()
        new = lora_compat.patched_weights(path, components)
        weight = components["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
        key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        torch.testing.assert_close(new[key], weight + up @ down, rtol=1e-6, atol=1e-6)
    finally:
        plugins.unregister_plugin(acme_plugin)
    assert "acme" not in plugins.registry().dialects


def test_duplicate_dialect_id_is_refused(tmp_path):
    class Rogue:
        @hookimpl
        def register_dialects(self, register):
            register(KohyaDialect())

    rogue = Rogue()
    plugins.register_plugin(rogue, name="rogue")
    try:
        with pytest.raises(lora_compat.LoraCompatError, match="'kohya', already provided by 'builtin'"):
            plugins.registry()
    finally:
        plugins.unregister_plugin(rogue)


def test_entry_point_package_is_discovered(tmp_path):
    """Build a tiny distribution with a `lora_compat` entry point and install it into a target dir."""
    env = install_plugin(tmp_path, "acme_lora", PLUGIN_SOURCE, "acme")
    up, down = torch.randn(8, 2), torch.randn(2, 8)
    lora = write_acme_file(tmp_path / "style.safetensors", up, down)
    cli = [sys.executable, "-m", "lora_compat"]

    listed = json.loads(subprocess.run(cli + ["dialects", "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    assert {"id": "acme", "plugin": "acme", "refuses": False, "description": "ACME trainer LoRAs"} in listed["dialects"]
    inspected = json.loads(subprocess.run(cli + ["inspect", "--json", str(lora)], env=env, check=True,
                                          capture_output=True, text=True).stdout)
    assert inspected["dialect"] == "acme"
    assert inspected["targets"] == 1
    assert inspected["components"] == {"unet": 1}

    without = subprocess.run(cli + ["inspect", str(lora)], capture_output=True, text=True)
    assert without.returncode == 2
    assert "no registered dialect recognises these keys" in without.stderr
