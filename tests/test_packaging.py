"""The distribution: every module under the six folders ships in the wheel as moezoo.<folder>...."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "zoo", "encoders", "pipelines", "training", "app")


def _source_modules() -> set[str]:
    modules = set()
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT).with_suffix("")
            modules.add("moezoo/" + "/".join(relative.parts) + ".py")
    return modules


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (wheel,) = out.glob("moezoo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_every_module_is_in_the_wheel(wheel_names):
    missing = sorted(_source_modules() - wheel_names)
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"


def test_no_bare_top_level_packages(wheel_names):
    # Bare `kernels`, `app`, `zoo`... would shadow PyPI projects of those names.
    tops = {name.split("/")[0] for name in wheel_names if not name.startswith("moezoo-")}
    assert tops == {"moezoo"}


def test_package_data_ships(wheel_names):
    for pattern_dir, suffix in (("moezoo/training/configs/", ".yaml"), ("moezoo/zoo/weights/", ".safetensors"),
                                ("moezoo/kernels/", ".c")):
        local = ROOT / pattern_dir.removeprefix("moezoo/")
        for path in local.glob(f"*{suffix}") if local.exists() else ():
            assert pattern_dir + path.name in wheel_names


def test_installed_subpackages_import():
    import moezoo.app
    import moezoo.encoders
    import moezoo.kernels
    import moezoo.pipelines
    import moezoo.training
    import moezoo.zoo

    assert moezoo.kernels.__name__ == "moezoo.kernels"


def test_readme_starts_with_the_two_commands_and_has_no_unfilled_template():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"], commands
    # a table pasted in by a script must not be left as its {name} placeholder
    placeholders = [line for line in text.splitlines() if re.fullmatch(r"\{[a-z_]+\}", line.strip())]
    assert not placeholders, f"unfilled README placeholders: {placeholders}"
