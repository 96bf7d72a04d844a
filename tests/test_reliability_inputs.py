"""Bad flags and checkpoints at the CLI: one `error:` line and exit 2, with the message that names
the real problem (not argparse's "expected one argument", not "no CUDA device", not a download)."""
import importlib
import os

import pytest
import torch

from var_ssg.graphs.config import get_preset
from var_ssg.common.errors import ConfigError
from tests.conftest import TINY
from var_ssg.tools.cli import run_main

MODEL = ["--model", TINY, "--random-init", "0"]


def cli(capsys, name, *args):
    """tools.commands.NAME.main under the CLI's error policy, in this process: (exit code, stderr)."""
    cmd = importlib.import_module(f"var_ssg.tools.commands.{name}")
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"^\d*$") as e:        # run_main always exits, with its code
        run_main(lambda: cmd.main([str(a) for a in args]))
    return e.value.code or 0, capsys.readouterr().err


def one_line_error(rc_err, msg):
    rc, err = rc_err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1 and msg in lines[0], (rc, err[-1500:])
    return lines[0]


@pytest.mark.parametrize("flag,value,msg", [
    ("--cfg", "-inf", "argument --cfg: '-inf' is not finite"),
    ("--cfg", "-nan", "argument --cfg: '-nan' is not finite"),
    ("--temperature", "-inf", "argument --temperature: '-inf' is not finite"),
    ("--top-p", "-nan", "argument --top-p: '-nan' is not finite"),
    ("--top-p", "-Infinity", "argument --top-p: '-Infinity' is not finite"),
])
def test_non_finite_numbers_name_the_flag(capsys, tmp_path, flag, value, msg):
    one_line_error(cli(capsys, "generate", *MODEL, flag, value, "--out", tmp_path / "x.png"), msg)
    assert list(tmp_path.iterdir()) == []


def test_negative_numbers_still_parse(capsys, tmp_path):
    from var_ssg.tools.cli import add_sampling_args, parser
    p = parser("t")
    add_sampling_args(p)
    a = p.parse_args(["--cfg", "-1e2", "--ssg-beta", "-0.5"])
    assert a.guidance == -100.0 and a.ssg_beta == "-0.5"


@pytest.mark.parametrize("device", ["meta", "mps", "cpu:1", "", "cuda:x"])
def test_unknown_devices_are_named(capsys, tmp_path, device):
    line = one_line_error(cli(capsys, "generate", *MODEL, "--device", device, "--out", tmp_path / "x.png"),
                          f"--device must be cpu or cuda")
    assert "CUDA device" not in line and repr(device) in line


def test_a_preset_name_with_a_newline_is_refused(capsys, tmp_path):
    one_line_error(cli(capsys, "export", "--model", TINY + "\n", "--random-init", "0", "--out", tmp_path / "a"),
                   "unknown preset 'var-d2-tiny\\n'")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="unknown preset 'var-d16 '; valid presets: var-d16, "):
        get_preset("var-d16 ")


def test_empty_checkpoint_flags_are_refused_before_any_download(capsys, tmp_path, monkeypatch):
    from var_ssg.graphs import weights
    monkeypatch.setattr(weights, "download_official", lambda cfg: pytest.fail("started a download"))
    one_line_error(cli(capsys, "export", "--model", "var-d16", "--ckpt", "", "--vae-ckpt", "", "--out", tmp_path / "a"),
                   "--ckpt is empty")


def test_safetensors_named_pth_is_not_called_pickled(capsys, tmp_path):
    from safetensors.torch import save_file
    from var_ssg.graphs.weights import random_state_dicts
    var_sd, vae_sd = random_state_dicts(get_preset(TINY), 0)
    save_file({k: v.contiguous() for k, v in var_sd.items()}, str(tmp_path / "var.pth"))
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(tmp_path / "vae.pth"))
    rc, err = cli(capsys, "generate", "--model", TINY, "--ckpt", tmp_path / "var.pth", "--vae-ckpt", tmp_path / "vae.pth",
                  "--class", "3", "--out", tmp_path / "x.png")
    assert rc == 0 and "pickled" not in err, err
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("case,msg", [
    ("int-key", "not a state dict of tensors (key 0 is a int"),
    ("nan", "holds NaN or infinite values"),
])
def test_bad_checkpoint_contents_are_one_line(capsys, tmp_path, case, msg):
    from var_ssg.graphs.weights import random_state_dicts
    var_sd, vae_sd = random_state_dicts(get_preset(TINY), 0)
    torch.save(vae_sd, tmp_path / "vae.pth")
    if case == "int-key":
        torch.save({0: torch.zeros(1)}, tmp_path / "var.pth")
    else:
        var_sd["head.weight"][0, 0] = float("nan")
        torch.save(var_sd, tmp_path / "var.pth")
    one_line_error(cli(capsys, "generate", "--model", TINY, "--ckpt", tmp_path / "var.pth", "--vae-ckpt",
                       tmp_path / "vae.pth", "--out", tmp_path / "x.png"), msg)
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------ control characters, long values
def _only_line(rc_err, msg):
    """One error line and nothing else on stderr (no forged second line), containing msg."""
    rc, err = rc_err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "error: " in lines[0] and msg in lines[0], (rc, err[-1500:])
    return lines[0]


@pytest.mark.parametrize("cmd,flag,name", [
    ("generate", "--out", "x\ny.png"),
    ("generate", "--out", "x\ry.png"),
    ("generate", "--out", "x\x1b[2Jy.png"),
    ("generate", "--save-tokens", "t\n.npz"),
    ("export", "--out", "art\nfacts"),
])
def test_an_output_name_with_a_control_character_is_refused(capsys, tmp_path, cmd, flag, name):
    """The issue's probe: --out $'x\\ny.png' wrote such a name and exited 0."""
    args = ["--model", "var-d2-tiny", "--random-init", "0", flag, str(tmp_path / name)]
    line = _only_line(cli(capsys, cmd, *args), "holds a control character")
    assert repr(name)[1:-1] in line                     # shown escaped
    assert os.listdir(tmp_path) == []


def test_a_control_character_in_a_value_never_forges_a_line(capsys, tmp_path):
    """--artifacts $'a\\nERROR: fake': the message names the path escaped, on one line."""
    line = _only_line(cli(capsys, "generate", "--artifacts", str(tmp_path / "a\nERROR: fake"),
                          "--backend", "onnxruntime", "--out", tmp_path / "o.png"), "a\\nERROR: fake")
    assert not (tmp_path / "o.png").exists() and "\x1b" not in line


@pytest.mark.parametrize("flag", ["--seed", "--random-init"])
def test_a_huge_value_is_cut_in_the_message(capsys, tmp_path, flag):
    """A 10,000-digit --seed was echoed whole (a 10,057-character line)."""
    args = ["--model", "var-d2-tiny", "--out", tmp_path / "o.png"] + (["--random-init", "0"] if flag == "--seed" else [])
    line = _only_line(cli(capsys, "generate", *args, flag, "9" * 10_000), f"argument {flag}")
    assert len(line) < 300 and "(10000 characters)" in line


def test_messages_escape_and_cut_whatever_raises_them(capsys):
    from var_ssg.common.text import one_line
    from var_ssg.tools.cli import run_main

    def boom():
        raise ConfigError("bad value " + "7" * 5000 + " in x\ny\u2028z")
    with pytest.raises(SystemExit):
        run_main(boom)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 300 and "x\\ny\\u2028z" in err
    assert one_line("a\tb") == "a\\tb"
