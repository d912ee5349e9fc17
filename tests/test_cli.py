"""What every command-line entry point shares: one line for bad input, quiet on a closed pipe, a
console script each. The entry points are found in the package, not listed by hand."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def command_modules() -> list[str]:
    """flaxdepth's modules with a command line: a `main` run under `if __name__ == "__main__"`."""
    return sorted(f"flaxdepth.{path.stem}" for path in (REPO / "flaxdepth").glob("*.py")
                  if 'if __name__ == "__main__":' in path.read_text())


def test_the_entry_points_are_found():
    assert {"flaxdepth.sweep", "flaxdepth.diagnose", "flaxdepth.bench"} <= set(command_modules())


@pytest.mark.parametrize("module", command_modules())
def test_bad_input_is_one_line_and_status_2(module, capsys):
    main = importlib.import_module(module).main
    assert main(["--no-such-flag"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()] and captured.err.startswith(
        f"python -m {module}: error: ")


def test_every_command_is_a_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts.values()) == [f"{module}:main" for module in command_modules()]
    assert all(script == "flaxdepth-" + target.split(":")[0].rsplit(".", 1)[1] for script, target in scripts.items())


def test_a_reader_that_stops_reading_ends_the_program_without_a_traceback():
    """`python -m flaxdepth.theory ... | head -0`: the reader is gone before the program writes."""
    process = subprocess.Popen([sys.executable, "-m", "flaxdepth.theory", "--variant", "tanh", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # long before the imports are done and the JSON is written
    stderr = process.stderr.read().decode()
    assert process.wait() == 1 and stderr == ""
