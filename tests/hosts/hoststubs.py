"""Loading the pinned host files for the tests: each host's folder on ``sys.path`` and, in ``sys.modules``, stubs
of what those files import that is not in ``shared/hosts`` (the webui core ``modules.*``, ComfyUI's model zoo...).
Each stub says in one line why it exists; everything else is the host's own, unmodified code."""
from __future__ import annotations

import ast
import enum
import logging
import sys
import types
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file


def stub(name: str, path: Iterable[str] | None = None, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = list(path)  # a package: real submodules below it still import
    module.__dict__.update(attrs)
    return module


class HostEnv:
    """``sys.path`` + stub modules for one host while it is imported and driven; ``close`` removes every module
    it added (host names collide: A1111 and Forge both have ``networks``, ``network``, ``modules.shared``)."""

    def __init__(self, root: Path, stubs: Iterable[types.ModuleType]):
        self.root = root.resolve()
        self.stubs = {m.__name__: m for m in stubs}
        self.saved = dict(sys.modules)
        self.path = list(sys.path)
        sys.path.insert(0, str(self.root))
        sys.modules.update(self.stubs)

    def bind(self) -> None:
        """Make each stub an attribute of its (imported) parent package, as an import would."""
        for name, module in self.stubs.items():
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)

    def _ours(self, name: str, module: Any) -> bool:
        if name in self.stubs:
            return True
        places = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", None) or [])]
        return any(str(p).startswith(str(self.root)) for p in places)

    def close(self) -> None:
        added = [name for name, module in list(sys.modules.items())
                 if self.saved.get(name) is not module and self._ours(name, module)]
        for name in added:
            del sys.modules[name]
        for name, module in self.saved.items():
            sys.modules.setdefault(name, module)
        sys.path[:] = self.path


def host_definitions(path: Path, names: Iterable[str], namespace: dict[str, Any], module: str) -> types.ModuleType:
    """A module made of the named top-level functions/classes of a host file, compiled from the file itself,
    for a file whose own imports cannot be met here (``comfy/sd.py`` imports every model family of ComfyUI)."""
    wanted = set(names)
    tree = ast.parse(path.read_text(encoding="utf8"), str(path))
    body = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in wanted]
    if {node.name for node in body} != wanted:
        raise AssertionError(f"{path}: no top-level {sorted(wanted - {n.name for n in body})}")
    result = stub(module, **namespace)
    result.__file__ = str(path)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), result.__dict__)
    return result


# -- ComfyUI -----------------------------------------------------------------------------------------------------
COMFY_MODEL_FAMILIES = ("BaseModel", "SD3", "StableCascade_C", "AuraFlow", "PixArt", "HunyuanDiT", "Flux", "GenmoMochi",
                        "HunyuanVideo", "HiDream", "ACEStep", "Omnigen2", "QwenImage")


class _ComfyArgs:
    """ComfyUI's command line as parsed with no flags, on the CPU."""

    cpu = True
    fast: set = set()

    def __getattr__(self, name: str) -> None:
        return None


class _PerformanceFeature(enum.Enum):
    Fp16Accumulation = "fp16_accumulation"


class _EnumHookMode(enum.Enum):
    MinVram = "minvram"
    MaxSpeed = "maxspeed"


class _CallbacksMP:
    ON_CLONE, ON_LOAD, ON_DETACH, ON_CLEANUP = "on_clone", "on_load_after", "on_detach_after", "on_cleanup"
    ON_PRE_RUN, ON_PREPARE_STATE, ON_APPLY_HOOKS = "on_pre_run", "on_prepare_state", "on_apply_hooks"
    ON_REGISTER_ALL_HOOK_PATCHES, ON_INJECT_MODEL, ON_EJECT_MODEL = "on_register", "on_inject", "on_eject"

    @classmethod
    def init_callbacks(cls) -> dict:
        return {}


class _WrappersMP:
    @classmethod
    def init_wrappers(cls) -> dict:
        return {}


def comfy_env(hosts: Path) -> tuple[HostEnv, types.SimpleNamespace]:
    """ComfyUI a125cd84: the real ``comfy.lora``, ``comfy.weight_adapter``, ``comfy.model_patcher``,
    ``comfy.utils``, ``comfy.model_management``; ``load_lora_for_models`` and ``CLIP`` from ``comfy/sd.py``;
    ``LoraLoader`` from ``nodes.py``."""
    root = hosts / "comfyui"
    env = HostEnv(root, [
        # comfy/cli_args.py is not in shared/hosts: the defaults of a CPU run
        stub("comfy.cli_args", args=_ComfyArgs(), PerformanceFeature=_PerformanceFeature),
        # comfy/checkpoint_pickle.py is not here; utils.py only hands it to torch.load for .ckpt files
        stub("comfy.checkpoint_pickle"),
        # comfy/model_base.py (every architecture) is not here; lora.py uses its classes in isinstance checks only
        stub("comfy.model_base", **{n: type(n, (torch.nn.Module,), {}) for n in COMFY_MODEL_FAMILIES}),
        # comfy/hooks.py is not here; model_patcher.py reads the hook mode and builds options from no hooks
        stub("comfy.hooks", EnumHookMode=_EnumHookMode,
             create_transformer_options_from_hooks=lambda patcher, hooks, options=None: options or {}),
        # comfy/patcher_extension.py is not here; model_patcher.py keeps empty callback/wrapper registries
        stub("comfy.patcher_extension", CallbacksMP=_CallbacksMP, WrappersMP=_WrappersMP, PatcherInjection=object,
             copy_nested_dicts=lambda d: {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}),
        # comfy/comfy_types is not here; model_patcher.py uses one type alias in annotations
        stub("comfy.comfy_types", UnetWrapperFunction=object),
        # folder_paths.py is not here; nodes.py lists the LoRA folder with it
        stub("folder_paths", get_filename_list=lambda kind: []),
    ])
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    import comfy.weight_adapter

    sd = host_definitions(root / "comfy" / "sd.py", ["load_lora_for_models", "CLIP"],
                          {"comfy": sys.modules["comfy"], "logging": logging, "torch": torch,
                           "model_management": comfy.model_management}, "comfy.sd")
    sys.modules["comfy.sd"] = sd
    env.stubs["comfy.sd"] = sd
    env.bind()
    nodes = host_definitions(root / "nodes.py", ["LoraLoader"],
                             {"comfy": sys.modules["comfy"], "folder_paths": sys.modules["folder_paths"]}, "nodes")
    return env, types.SimpleNamespace(lora=comfy.lora, weight_adapter=comfy.weight_adapter, sd=sd, nodes=nodes,
                                      model_patcher=comfy.model_patcher, utils=comfy.utils,
                                      model_base=sys.modules["comfy.model_base"])


# -- the webui family --------------------------------------------------------------------------------------------
class _Opts(types.SimpleNamespace):
    """``shared.opts`` as A1111 builds it: unset options read their template's default."""

    def __init__(self, templates: dict, **values: Any):
        super().__init__(**values)
        object.__setattr__(self, "data_labels", templates)

    def __getattr__(self, name: str) -> Any:
        info = self.data_labels.get(name)
        if info is None:
            raise AttributeError(name)
        return info.default

    def add_option(self, key: str, info: "OptionInfo") -> None:
        """modules/options.py: the template, and the value when none was saved."""
        self.data_labels[key] = info
        if key not in vars(self):
            setattr(self, key, info.default)


class OptionInfo:
    """modules/options.py's OptionInfo (default, label, section)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default, self.label, self.section = default, label, section


def options_section(section: tuple, options: dict) -> dict:
    """modules/options.py's options_section: stamps the section on each option."""
    for info in options.values():
        info.section = section
    return options


class ScriptCallbacks(types.ModuleType):
    """modules/script_callbacks.py's registries: ``on_*`` record, ``*_callback`` run them (as the host does)."""

    def __init__(self):
        super().__init__("modules.script_callbacks")
        self.registered: dict[str, list] = {}

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda fn, *a, **k: self.registered.setdefault(name[3:], []).append(fn)
        if name.endswith("_callback"):
            return lambda *args: [fn(*args) for fn in self.registered.get(name[: -len("_callback")], [])]
        raise AttributeError(name)


def webui_core(lora_dir: Path, sd_model: Any = None, modules_path: Iterable[str] = ()) -> list[types.ModuleType]:
    """The webui core (``modules/*.py``, not in shared/hosts), reduced to what the LoRA files touch."""
    templates: dict = {}
    shared = stub(
        "modules.shared", options_templates=templates, options_section=options_section, OptionInfo=OptionInfo,
        opts=_Opts(templates, lora_functional=False, lora_in_memory_limit=0, lora_not_found_warning_console=False,
                   lora_not_found_gradio_warning=False, lora_preferred_name="Alias from file",
                   lora_force_reload=False, sd_model_checkpoint="tiny", extra_networks_default_multiplier=1.0,
                   lora_fuse_native=False, lora_fuse_diffusers=False),
        cmd_opts=types.SimpleNamespace(lora_dir=str(lora_dir), lyco_dir_backcompat=str(lora_dir)),
        walk_files=lambda *a, **k: [], sd_model=sd_model, sd_loaded=sd_model is not None)
    errors = stub("modules.errors", display=lambda e, task: (_ for _ in ()).throw(e), report=lambda *a, **k: None)
    return [
        stub("modules", path=modules_path), shared, errors, ScriptCallbacks(),
        stub("modules.sd_models", read_state_dict=lambda filename, **kwargs: load_file(str(filename)),
             read_metadata_from_safetensors=lambda filename: {}),
        stub("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
             torch_gc=lambda: None, cond_cast_unet=lambda x: x),
        stub("modules.cache", cached_data_for_file=lambda *a: {}),
        stub("modules.hashes", sha256_from_cache=lambda *a, **k: "", sha256=lambda *a, **k: ""),
        stub("modules.scripts", scripts_txt2img=types.SimpleNamespace(infotext_fields=[])),
        stub("modules.sd_hijack", model_hijack=types.SimpleNamespace(comments=[])),
        stub("modules.patches", patch=lambda key, obj, field, replacement: getattr(obj, field),
             undo=lambda key, obj, field: None),
        stub("modules.textual_inversion", path=[]),
        stub("modules.textual_inversion.textual_inversion"),
    ]


def a1111_env(hosts: Path, lora_dir: Path, sd_model: Any) -> tuple[HostEnv, types.SimpleNamespace]:
    """A1111 v1.8.0's built-in Lora extension: the real ``networks``, ``network``, ``network_*``."""
    root = hosts / "a1111" / "extensions-builtin" / "Lora"
    # gradio is not installed here; networks.py only raises gr.Warning when a LoRA is missing
    env = HostEnv(root, [*webui_core(lora_dir, sd_model), stub("gradio", Warning=Warning)])
    env.bind()
    import network
    import networks

    return env, types.SimpleNamespace(network=network, networks=networks, shared=sys.modules["modules.shared"],
                                      script_callbacks=sys.modules["modules.script_callbacks"])


def forge_env(hosts: Path, lora_dir: Path) -> tuple[HostEnv, types.SimpleNamespace]:
    """Forge dfdcbab6: the real ``networks.load_lora_for_models``, ``backend.patcher.lora`` (key maps,
    ``load_lora``, ``merge_lora_to_weight``, ``LoraLoader``) and ComfyUI's lora collection."""
    root = hosts / "forge"
    env = HostEnv(root, [
        *webui_core(lora_dir),
        # backend/args.py is not here: no online LoRA
        stub("backend.args", dynamic_args={}),
        # backend/utils.py is not here: the attribute helpers LoraLoader uses, and the file reader
        stub("backend.utils", load_torch_file=lambda filename, safe_load=True: load_file(str(filename)),
             get_attr=_get_attr, get_attr_with_parent=_get_attr_with_parent, set_attr_raw=_set_attr_raw,
             tensor2parameter=lambda t: t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, False)),
        # backend/memory_management.py is not here: the CPU answers of its helpers
        stub("backend.memory_management", signal_empty_cache=False, soft_empty_cache=lambda: None,
             cast_to_device=lambda t, device, dtype, copy=False: t.to(device=device, dtype=dtype, copy=copy)),
        # backend/operations.py is not here: no bitsandbytes
        stub("backend.operations", bnb_avaliable=False),
        # at dfdcbab6 packages_3rdparty/webui_lora_collection/lora.py holds only "# TODO: Implement API"
        stub("packages_3rdparty.webui_lora_collection", path=[]),
        stub("packages_3rdparty.webui_lora_collection.lora"),
    ])
    sys.path.insert(0, str(root / "extensions-builtin" / "sd_forge_lora"))
    env.bind()
    import backend.patcher.lora as backend_lora
    import network
    import networks

    return env, types.SimpleNamespace(networks=networks, network=network, backend=backend_lora)


def _get_attr(obj: Any, key: str) -> Any:
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


def _get_attr_with_parent(obj: Any, key: str) -> tuple[Any, str, Any]:
    *parents, child = key.split(".")
    parent = _get_attr(obj, ".".join(parents)) if parents else obj
    return parent, child, getattr(parent, child)


def _set_attr_raw(obj: Any, key: str, value: Any) -> None:
    parent, child, _ = _get_attr_with_parent(obj, key)
    setattr(parent, child, value)


def sdnext_env(hosts: Path, lora_dir: Path) -> tuple[HostEnv, types.SimpleNamespace]:
    """SD.Next 058a7f0c: the real ``modules.lora`` package (``extra_networks_lora``, ``lora_common``...)."""
    root = hosts / "sdnext"
    core = webui_core(lora_dir, modules_path=[str(root / "modules")])
    log = types.SimpleNamespace(**{k: (lambda *a, **kw: None) for k in ("trace", "debug", "info", "warning", "error")})
    env = HostEnv(root, [
        *core,
        # modules/logger.py, extra_networks.py, errorlimiter.py, sd_*.py, files_cache.py are SD.Next's core, not here
        stub("modules.logger", log=log, console=None),
        stub("modules.extra_networks", ExtraNetwork=type("ExtraNetwork", (), {"__init__": lambda self, name: None})),
        stub("modules.errorlimiter", limit_errors=None),
        stub("modules.sd_checkpoint", read_metadata_from_safetensors=lambda filename: {}),
        stub("modules.sd_models_compile"), stub("modules.files_cache"),
        stub("modules.sd_models_utils"),
    ])
    env.bind()
    import modules.lora.extra_networks_lora as extra_networks_lora
    import modules.lora.lora_common as lora_common
    import modules.lora.lora_load as lora_load
    import modules.lora.network as network

    return env, types.SimpleNamespace(extra_networks_lora=extra_networks_lora, lora_common=lora_common,
                                      lora_load=lora_load, network=network, shared=sys.modules["modules.shared"])
