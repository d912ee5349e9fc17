"""What every command-line entry point shares."""

import importlib
import subprocess
import sys

import pytest

ENTRY_POINTS = ["bench", "convert", "diagnose", "sweep", "theory", "variants"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_is_quiet_on_a_closed_pipe(module):
    main = importlib.import_module(f"flaxdepth.{module}").main
    assert main.__wrapped__.__module__ == f"flaxdepth.{module}"  # flaxdepth.cli.quiet_on_closed_pipe


def test_a_reader_that_stops_reading_ends_the_program_without_a_traceback():
    """`python -m flaxdepth.theory ... | head -0`: the reader is gone before the program writes."""
    process = subprocess.Popen([sys.executable, "-m", "flaxdepth.theory", "--variant", "tanh", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # long before the imports are done and the JSON is written
    stderr = process.stderr.read().decode()
    assert process.wait() == 1 and stderr == ""
