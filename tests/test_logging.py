"""Library messages go through `logging`, rank-aware; wrong logging/progress settings stop before any work."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from caldera.cli import main
from caldera.log import get_logger, rank_and_size, set_rank
from tests.conftest import ROOT, run_ranks

SCRIPT = """
import logging, sys
import caldera
from caldera.log import get_logger
log = get_logger("caldera.demo")
log.info("before init: said by rank 0 only")
world = caldera.init()
log.info("after init: said by rank 0 only")
log.warning(f"every rank warns (rank {world.rank})")
log.debug("hidden unless CALDERA_LOG_LEVEL=DEBUG")
"""


@pytest.mark.mpi
def test_two_ranks_rank0_informs_every_rank_warns_each_named():
    proc = run_ranks(2, ["-c", SCRIPT])
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    # Informational records once per job, from rank 0, before and after init (launcher variables, then MPI).
    assert err.count("caldera: before init: said by rank 0 only") == 1, proc.stderr
    assert err.count("caldera: after init: said by rank 0 only") == 1, proc.stderr
    # Warnings from every rank; other ranks than 0 say who they are.
    assert (
        "caldera: every rank warns (rank 0)" in err and "caldera[rank 1/2]: every rank warns (rank 1)" in err
    )
    assert not any("hidden" in line for line in err) and "caldera" not in proc.stdout


def test_a_program_that_configures_logging_gets_the_records_with_their_rank():
    script = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s %(rank)s %(levelname)s %(message)s')\n"
        "logging.getLogger().setLevel(logging.INFO)\n"
        "from caldera.log import get_logger\n"
        "get_logger('caldera.demo').info('hello')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    # The program's own handler (on stdout) shows it once with the rank; Caldera adds no second handler.
    assert proc.stdout.splitlines() == ["caldera.demo 0 INFO hello"] and "hello" not in proc.stderr


def test_rank_filter_keeps_warnings_of_other_ranks_and_drops_their_info(caplog):
    log = get_logger("caldera.test")
    try:
        set_rank(3, 4)
        assert rank_and_size() == (3, 4)
        with caplog.at_level(logging.INFO, logger="caldera"):
            log.info("chatter")
            log.warning("trouble")
        assert [(r.getMessage(), r.rank) for r in caplog.records] == [("trouble", 3)]
    finally:
        set_rank(None)


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("CALDERA_PROGRESS_INTERVAL", "soon", "CALDERA_PROGRESS_INTERVAL='soon' is not a number of seconds"),
        ("CALDERA_PROGRESS_INTERVAL", "-5", "CALDERA_PROGRESS_INTERVAL='-5' is not a number of seconds"),
        ("CALDERA_LOG_LEVEL", "chatty", "CALDERA_LOG_LEVEL='CHATTY' is not a level"),
    ],
)
def test_a_wrong_setting_in_the_environment_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, var,
                                                                         value, says):  # fmt: skip
    monkeypatch.setenv(var, value)
    run_dir = tmp_path / "run"
    assert main(["train", "examples/heat_surrogate.toml", "--set", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and err[0].startswith("caldera: error:"), err
    assert not run_dir.exists()  # stopped before the data was built or anything written
