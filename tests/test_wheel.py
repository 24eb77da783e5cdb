"""Build the sdist and wheel, install the wheel into a clean venv and use it.

Checks that the Lua scripts from the top-level ``lua/`` directory really ship
as ``kombu_streams/lua/*.lua`` and that an installed (not source-checkout)
package registers the ``redis-streams://`` scheme with kombu and works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import missing

import kombu_streams

REPO = Path(__file__).resolve().parent.parent
#: The one place the version is written (pyproject.toml reads it: [tool.hatch.version]).
VERSION = kombu_streams.__version__

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SNIPPET = textwrap.dedent(
    """
    import json, os, sys
    import kombu, kombu_streams
    lua_dir = os.path.join(os.path.dirname(kombu_streams.__file__), "lua")
    c = kombu.Connection(sys.argv[1])
    q = c.SimpleQueue("wheeltest")
    q.put({"n": 1})
    m = q.get(timeout=5)
    assert m.payload == {"n": 1}, m.payload
    m.ack()
    q.close()
    c.close()
    print(json.dumps({
        "module": os.path.realpath(kombu_streams.__file__),
        "kombu": os.path.realpath(kombu.__file__),
        "lua": sorted(f for f in os.listdir(lua_dir) if f.endswith(".lua")),
        "prefix": os.path.realpath(sys.prefix),
    }))
    """
)


def _clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE"}
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{argv!r} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory) -> Path:
    try:
        import build  # noqa: F401
    except ImportError:
        missing("the 'build' package is not installed (pip install '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    # No --wheel/--sdist: build the sdist first, then the wheel *from the sdist*,
    # which also proves the sdist carries lua/.
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], env=_clean_env())
    return out


def test_sdist_contains_lua(dist_dir):
    (sdist,) = dist_dir.glob(f"kombu_streams-{VERSION}.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert any(n.startswith("lua/") and n.endswith(".lua") for n in names), names
    for name in ("kombu_streams/__init__.py", "kombu_streams/py.typed", "pyproject.toml",
                 "LICENSE", "CHANGELOG.rst"):
        assert name in names, name


def test_wheel_contents(dist_dir):
    (wheel,) = dist_dir.glob(f"kombu_streams-{VERSION}-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kombu_streams/__init__.py" in names
    assert "kombu_streams/py.typed" in names  # PEP 561: type checkers use our hints
    assert f"kombu_streams-{VERSION}.dist-info/licenses/LICENSE" in names, names
    metadata = zipfile.ZipFile(wheel).read(
        f"kombu_streams-{VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "\nLicense-Expression: BSD-3-Clause\n" in metadata
    lua = [n for n in names if n.startswith("kombu_streams/lua/") and n.endswith(".lua")]
    assert lua, names
    # Every lua/**/*.lua of the checkout must be shipped, keeping subdirectories.
    lua_src = REPO / "lua"
    expected = {
        f"kombu_streams/lua/{p.relative_to(lua_src).as_posix()}" for p in lua_src.rglob("*.lua")
    }
    assert expected <= set(names), sorted(expected - set(names))
    assert not any(n.startswith(("tests/", "lua/")) for n in names), names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "kombu-streams = kombu_streams.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_installed_wheel_round_trip(dist_dir, redis_server, tmp_path):
    (wheel,) = dist_dir.glob(f"kombu_streams-{VERSION}-*.whl")
    env_dir = tmp_path / "venv"
    # A clean venv: no system site-packages, nothing from the test environment.
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = _clean_env(VIRTUAL_ENV=str(env_dir))

    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], env=env, cwd=workdir)

    url = redis_server.url.replace("redis://", "redis-streams://", 1)
    proc = _run(
        [str(python), "-I", "-c", SNIPPET, url],
        env=env,
        cwd=workdir,  # so the source checkout is not importable
        timeout=120,
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])

    venv_root = os.path.realpath(env_dir)
    assert info["prefix"] == venv_root
    assert info["module"].startswith(venv_root + os.sep), info
    # not the checkout's package (the venv itself may lie under the checkout: nox's tmp)
    assert not info["module"].startswith(str((REPO / "kombu_streams").resolve()) + os.sep), info
    assert "site-packages" in info["module"], info
    assert info["kombu"].startswith(venv_root + os.sep), info
    assert info["lua"], "no .lua files next to the installed package"
