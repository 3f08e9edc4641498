"""The host folders install lora_compat into the host's own Python from their own source, never from a package
index: the webui's install.py through ``launch.run_pip``, ComfyUI's install.py (and the node package's import guard)
through ``sys.executable -m pip``. The source is the checkout a ``lora-compat install`` link resolves into, or the
``lora_compat_src/`` a ``--copy`` carries (rebuilt with a minimal pyproject when lora_compat was installed from a
wheel). The hosts' pip is replaced by recorders, except where a test really installs."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_compat.hosts.install import install

from installed import PURELIB, ROOT, clean_env, installed_site, pip_install

FAKE_LAUNCH = """
import json, os

def run_pip(command, desc=None, live=False):
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps([command, desc]) + "\\n")
"""
FAKE_PIP = """
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""
#: a pip that records its arguments, then really installs (no deps, into $TARGET) with the real pip
INSTALLING_PIP = FAKE_PIP + """
fakes = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != fakes]
del sys.modules["pip"]
sys.argv = ["pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", os.environ["TARGET"],
            sys.argv[-1]]
import runpy
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""
#: how ComfyUI loads a custom node folder (nodes.load_custom_node)
LOAD_NODE = """
import importlib.util, sys
path = sys.argv[1]
name = path.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
import lora_compat
print(lora_compat.__file__)
print(sorted(module.NODE_CLASS_MAPPINGS))
"""


def fake_host(root: Path, host: str) -> Path:
    names = {"webui": ["launch.py", "webui.py", "modules/"], "comfyui": ["main.py", "nodes.py", "comfy/"]}[host]
    root.mkdir(parents=True)
    for name in names:
        (root / name.rstrip("/")).mkdir() if name.endswith("/") else (root / name).write_text("")
    return root


def fakes(tmp_path: Path, pip: str = FAKE_PIP) -> Path:
    folder = tmp_path / "fakes"
    (folder / "pip").mkdir(parents=True)
    (folder / "launch.py").write_text(FAKE_LAUNCH)
    (folder / "pip" / "__init__.py").write_text("")
    (folder / "pip" / "__main__.py").write_text(pip)
    return folder


def run_script(script: Path, tmp_path: Path, importable: bool, pythonpath: list[Path] = ()
               ) -> tuple[subprocess.CompletedProcess, list]:
    """Run a host folder's install.py as its host does (``python install.py`` in the folder), with the fakes first on
    the path; without ``importable``, under ``-S``: no site-packages, so no lora_compat."""
    record = tmp_path / "record.jsonl"
    record.unlink(missing_ok=True)
    path = [tmp_path / "fakes" if (tmp_path / "fakes").exists() else fakes(tmp_path), *pythonpath]
    env = clean_env(PYTHONPATH=":".join(map(str, path)), RECORD=str(record))
    command = [sys.executable, *([] if importable else ["-S"]), str(script)]
    done = subprocess.run(command, cwd=script.parent, env=env, capture_output=True, text=True, timeout=300)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


def installed_folder(tmp_path: Path, host: str, copy: bool) -> Path:
    root = fake_host(tmp_path / host, host)
    target, _ = install(host, root, copy=copy)
    return target


def test_a_link_resolves_into_this_checkout() -> None:
    """The tests below rely on it: the editable install's host folders live in the checkout."""
    from lora_compat.hosts.install import source_folder

    assert source_folder("webui") == ROOT / "adapters" / "webui"


@pytest.mark.parametrize("copy", [False, True], ids=["link", "copy"])
def test_webui_install_py_installs_the_folders_own_source_with_run_pip(tmp_path: Path, copy: bool) -> None:
    folder = installed_folder(tmp_path, "webui", copy)
    source = folder.resolve() / "lora_compat_src" if copy else ROOT
    done, calls = run_script(folder / "install.py", tmp_path, importable=False)
    assert done.returncode == 0, done.stderr
    assert calls == [[f'install "{source}"', f"lora_compat from {source}"]]
    assert done.stdout == f"[lora_compat] installing lora_compat from {source} into {sys.executable}\n"


@pytest.mark.parametrize("copy", [False, True], ids=["link", "copy"])
def test_comfyui_install_py_installs_the_folders_own_source_with_its_python(tmp_path: Path, copy: bool) -> None:
    folder = installed_folder(tmp_path, "comfyui", copy)
    source = folder.resolve() / "lora_compat_src" if copy else ROOT
    done, calls = run_script(folder / "install.py", tmp_path, importable=False)
    assert done.returncode == 0, done.stderr
    assert calls == [["install", str(source)]]
    assert done.stdout == f"[lora_compat] installing lora_compat from {source} into {sys.executable}\n"


def test_comfyui_requirements_name_no_package() -> None:
    """ComfyUI-Manager pip-installs every line of requirements.txt: none may name lora-compat (no index has it)."""
    lines = (ROOT / "adapters" / "comfyui" / "requirements.txt").read_text().splitlines()
    assert lines and all(line.startswith("#") for line in lines if line.strip())


@pytest.mark.parametrize("host", ["webui", "comfyui"])
def test_an_up_to_date_lora_compat_is_left_alone_and_a_stale_one_reinstalled(tmp_path: Path, host: str) -> None:
    """This Python imports the checkout's lora_compat (editable): a link into the checkout and a fresh copy are up
    to date; once the copy's source differs, it is installed."""
    linked = installed_folder(tmp_path / "a", host, copy=False)
    done, calls = run_script(linked / "install.py", tmp_path, importable=True)
    assert (done.returncode, calls, done.stdout) == (0, [], "")
    copied = installed_folder(tmp_path / "b", host, copy=True)
    done, calls = run_script(copied / "install.py", tmp_path, importable=True)
    assert (done.returncode, calls, done.stdout) == (0, [], "")
    errors = copied / "lora_compat_src" / "lora_compat" / "errors.py"
    errors.write_text(errors.read_text() + "\n# changed\n")
    done, calls = run_script(copied / "install.py", tmp_path, importable=True)
    source = str(copied.resolve() / "lora_compat_src")
    assert calls == ([[f'install "{source}"', f"lora_compat from {source}"]] if host == "webui"
                     else [["install", source]])


@pytest.mark.parametrize("host", ["webui", "comfyui"])
def test_a_folder_without_a_source_fails_with_one_line(tmp_path: Path, host: str) -> None:
    folder = installed_folder(tmp_path, host, copy=True)
    for path in sorted((folder / "lora_compat_src").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (folder / "lora_compat_src").rmdir()
    done, calls = run_script(folder / "install.py", tmp_path, importable=False)
    again = {"webui": "the extension with `lora-compat install webui DIR --copy`",
             "comfyui": "the node folder with `lora-compat install comfyui DIR --copy`"}[host]
    assert (done.returncode, calls, done.stdout) == (1, [], "")
    assert done.stderr == (f"[lora_compat] cannot install lora_compat: {folder} carries no lora_compat source; "
                           f"reinstall {again}\n")


def test_a_link_into_an_installed_wheel_has_no_source(tmp_path: Path) -> None:
    """Linked from a non-editable install: with that lora_compat importable there is nothing to do; in a Python
    without it, one line says what to do."""
    root = fake_host(tmp_path / "webui", "webui")
    folder = root / "extensions" / "lora-compat"
    folder.parent.mkdir()
    folder.symlink_to(installed_site() / "lora_compat" / "adapters" / "webui", target_is_directory=True)
    done, calls = run_script(folder / "install.py", tmp_path, importable=False, pythonpath=[installed_site()])
    assert (done.returncode, calls, done.stdout, done.stderr) == (0, [], "", "")
    done, calls = run_script(folder / "install.py", tmp_path, importable=False)
    assert (done.returncode, calls, done.stdout) == (1, [], "")
    assert done.stderr == (
        f"[lora_compat] cannot install lora_compat into {sys.executable}: {folder} carries no lora_compat source (no "
        "lora_compat_src/ from `lora-compat install --copy`, and it is not a link into a lora-compat checkout); "
        "reinstall the folder with `lora-compat install <webui|comfyui> DIR --copy`\n")


def test_comfyui_node_package_installs_lora_compat_on_first_import(tmp_path: Path) -> None:
    """A ComfyUI whose Python lacks lora_compat loads the copied node folder: its import guard pip-installs the
    bundled source (really, into a target folder on the path) and the nodes load from the installed package."""
    folder = installed_folder(tmp_path, "comfyui", copy=True)
    fakes(tmp_path, INSTALLING_PIP)
    target = tmp_path / "target"
    target.mkdir()
    record = tmp_path / "record.jsonl"
    env = clean_env(PYTHONPATH=":".join(map(str, [tmp_path / "fakes", target, PURELIB])), RECORD=str(record),
                    TARGET=str(target))
    done = subprocess.run([sys.executable, "-S", "-c", LOAD_NODE, str(folder)], cwd=tmp_path / "comfyui", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    source = folder.resolve() / "lora_compat_src"
    assert [json.loads(line) for line in record.read_text().splitlines()] == [["install", str(source)]]
    assert done.stdout.splitlines() == [
        f"[lora_compat] installing lora_compat from {source} into {sys.executable}",
        str(target / "lora_compat" / "__init__.py"), "['LoraCompatInfo', 'LoraCompatLoader']"]


def test_a_copy_made_from_an_installed_wheel_carries_an_installable_source(tmp_path: Path) -> None:
    """lora_compat installed from a wheel has no pyproject: ``--copy`` rebuilds one from the distribution's
    metadata. Installing that source gives the same package: modules, data files, entry points, version."""
    site = installed_site()
    root = fake_host(tmp_path / "comfyui", "comfyui")
    code = textwrap.dedent("""
        import sys
        import lora_compat
        assert lora_compat.__file__.startswith(sys.argv[1]), lora_compat.__file__
        from lora_compat.hosts.install import install
        print(install("comfyui", sys.argv[2], copy=True)[0])
    """)
    done = subprocess.run([sys.executable, "-P", "-c", code, str(site), str(root)], cwd=tmp_path,
                          env=clean_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    source = Path(done.stdout.strip()) / "lora_compat_src"
    assert "written by `lora-compat install --copy`" in (source / "pyproject.toml").read_text()
    pip_install(source, tmp_path / "again")

    def files(top: Path) -> set[str]:
        return {p.relative_to(top).as_posix() for p in top.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}

    assert files(tmp_path / "again" / "lora_compat") == files(site / "lora_compat")
    for name in ("corpus/invokeai_anima_comfyui_keys.json.gz", "archs/tables/sd15.json.gz",
                 "adapters/webui/scripts/lora_compat_script.py", "oracles/lycoris_oracle.py"):
        assert (tmp_path / "again" / "lora_compat" / name).read_bytes() == (site / "lora_compat" / name).read_bytes()
    [before] = site.glob("lora_compat-*.dist-info")
    [after] = (tmp_path / "again").glob("lora_compat-*.dist-info")
    assert after.name == before.name
    assert (after / "entry_points.txt").read_text() == (before / "entry_points.txt").read_text()
    check = "import lora_compat, sys; from lora_compat import plugins; print(lora_compat.__file__, sorted(plugins.registry().dialects)[:2])"
    done = subprocess.run([sys.executable, "-P", "-c", check], cwd=tmp_path,
                          env=clean_env(PYTHONPATH=str(tmp_path / "again")), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(tmp_path / "again" / "lora_compat" / "__init__.py"))
