"""The installer (rlhf_lib/install.py): which torch build it picks, and what it does when PyTorch's index fails."""

from rlhf_lib import install


def test_torch_build_is_cpu_on_linux_without_a_gpu_only():
    assert install.torch_build("Linux", gpu=False) == "cpu"
    assert install.torch_build("Linux", gpu=True) == "pypi"
    assert install.torch_build("Darwin", gpu=False) == "pypi"  # PyPI's macOS wheel is the CPU/MPS build


def test_torch_pin_is_the_requirements_line(tmp_path):
    assert install.torch_pin().startswith("torch==")
    (tmp_path / "requirements.txt").write_text("numpy\n")
    try:
        install.torch_pin(tmp_path / "requirements.txt")
    except SystemExit as exc:
        assert "pins no torch version" in str(exc)
    else:
        raise AssertionError("a requirements file without a torch pin was accepted")


def test_cpu_index_first_then_requirements(capsys, monkeypatch):
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(install.platform, "system", lambda: "Linux")
    assert install.main(["--dev", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[0] and install.torch_pin() in lines[0]
    assert lines[1].endswith("requirements-dev.txt")


def test_falls_back_to_the_configured_index_when_the_cpu_index_fails(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(install.platform, "system", lambda: "Linux")
    monkeypatch.setattr(install, "_run", lambda cmd: ran.append(cmd) or (1 if "--index-url" in cmd else 0))
    assert install.main([]) == 0
    assert [("--index-url" in c, c[-1]) for c in ran] == [
        (True, "30"), (False, install.torch_pin()), (False, str(install.ROOT / "requirements.txt"))]
    assert "could not be used" in capsys.readouterr().out


def test_a_failed_requirements_install_fails(monkeypatch):
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(install, "_run", lambda cmd: 1 if "-r" in cmd else 0)
    assert install.main([]) == 1
