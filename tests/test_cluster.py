"""cluster.ray_session: a Ray lifecycle is an object (RaySession) that undoes what it changed in
this process, with no module state shared between sessions. No Ray instance comes up here: the
starts fail at once (a session directory that cannot exist)."""
import os

import pytest

from var_ssg.cluster import RayConfig, RaySession, session
from var_ssg.common.errors import ConfigError


def _failing(**env):
    return RayConfig(num_cpus=1, temp_dir="/dev/null/not-a-dir", env=env)


def test_a_failed_start_is_one_line_and_leaves_the_process_as_it_was(monkeypatch):
    from ray._private import ray_constants
    monkeypatch.delenv("VAR_SSG_PROBE", raising=False)
    monkeypatch.setenv("RAY_worker_register_timeout_seconds", "7")
    flag = ray_constants.ENABLE_RAY_CLUSTER
    s = RaySession(_failing(VAR_SSG_PROBE="1"))
    with pytest.raises(ConfigError, match=r"^could not start a local Ray instance: .*Not a directory") as e:
        s.start()
    assert "\n" not in str(e.value)
    assert "VAR_SSG_PROBE" not in os.environ                                  # set by start, removed by stop
    assert os.environ["RAY_worker_register_timeout_seconds"] == "7"          # changed by start, restored
    assert ray_constants.ENABLE_RAY_CLUSTER == flag                          # Ray's single-machine flag undone
    s.stop()                                                                 # stopping twice is harmless


def test_sessions_keep_their_own_state(monkeypatch):
    """Two sessions: what one saved is never restored by the other (no module-level state)."""
    monkeypatch.setenv("VAR_SSG_PROBE", "before")
    a, b = RaySession(_failing(VAR_SSG_PROBE="a")), RaySession(_failing())
    with pytest.raises(ConfigError, match="could not start"):
        with session(b.cfg):
            pass
    a._set_env({"VAR_SSG_PROBE": "a"})
    b.stop()
    assert os.environ["VAR_SSG_PROBE"] == "a"           # b never touched it
    a.stop()
    assert os.environ["VAR_SSG_PROBE"] == "before"


def test_a_bad_config_is_refused_before_anything_changes():
    with pytest.raises(ConfigError, match="needs a whole number of CPUs >= 1, got 0"):
        RaySession(RayConfig(num_cpus=0, env={"VAR_SSG_PROBE": "1"})).start()
    assert "VAR_SSG_PROBE" not in os.environ
