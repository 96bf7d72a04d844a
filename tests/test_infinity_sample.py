"""scripts/sample.py and sweep.py --prompts FILE on Infinity (evaluation/prompt_samples.py): the
prompt file (blank lines, a trailing newline, an empty file), the ADM-format .npz (images of
prompt-major order with seed S + i, equal to the pipeline run directly; labels = prompt index;
the prompts; settings), PNGs, reuse with --resume, a sweep of beta 0 against beta > 0, and the
flags each family refuses. infinity-tiny on the eager backend with seeded random weights and a
tiny T5 built here: no export, no network."""
import json

import numpy as np
import pytest

from var_ssg.common.errors import ConfigError
from var_ssg.evaluation.prompt_samples import read_prompts
from var_ssg.evaluation.samples import NpzBatch
from var_ssg.graphs.infinity_config import get_infinity_preset
from tests.test_infinity_export import _t5

TINY = "infinity-tiny"
SRC = ["--model", TINY, "--random-init", "0"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _t5(tmp_path_factory.mktemp("t5") / "t5", get_infinity_preset(TINY).text_dim)


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n\n   \n  a red chair  \na blue dog on the tree\n", encoding="utf-8")
    return str(p)


def test_prompt_file_blank_lines_trailing_newline_and_empty(tmp_path, prompts):
    assert read_prompts(prompts) == ("a cat", "a red chair", "a blue dog on the tree")
    (tmp_path / "one.txt").write_text("a cat", encoding="utf-8")              # no trailing newline
    assert read_prompts(str(tmp_path / "one.txt")) == ("a cat",)
    (tmp_path / "crlf.txt").write_bytes(b"a cat\r\n\r\na dog\r\n")
    assert read_prompts(str(tmp_path / "crlf.txt")) == ("a cat", "a dog")
    for name, text in (("empty.txt", ""), ("blank.txt", "\n  \n\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match="has no prompts.*one prompt a line"):
            read_prompts(str(tmp_path / name))
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_prompts(str(tmp_path / "bin.txt"))


def test_sample_npz_pngs_equal_the_pipeline_and_resume(t5_dir, prompts, tmp_path, capsys):
    from PIL import Image
    from var_ssg.runtime.images import to_uint8
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    from var_ssg.tools.commands.sample import main
    from var_ssg.tools.infinity_cli import encode
    out, pngs = tmp_path / "s.npz", tmp_path / "png"
    pngs.mkdir()
    args = SRC + ["--prompts", prompts, "--per-prompt", "2", "--text-encoder", t5_dir, "--seed", "5",
                  "--aspect-ratio", "3:4", "--ssg-beta", "0.5", "--batch", "3", "--out", str(out)]
    assert main(args + ["--png-dir", str(pngs)]) == 0
    z = NpzBatch(str(out))
    assert z.shape == (6, 60, 80, 3)
    assert z.get("labels").tolist() == [0, 0, 1, 1, 2, 2]
    assert z.get("prompts").tolist() == ["a cat", "a red chair", "a blue dog on the tree"]
    s = z.settings
    assert (s["model"], s["per_prompt"], s["seed"], s["template"], s["ssg_beta"], s["cfg"], s["batch"]) == (
        TINY, 2, 5, 0.75, "0.5", 3.0, 3)
    # image i is prompt i // 2 with seed 5 + i (the first batch run again directly: eager float
    # arithmetic depends on the batch shape, so the same batch)
    pipe, _ = open_infinity(model=TINY, random_init=0)
    texts = [p for p in s["prompts"] for _ in range(2)][:3]
    emb, mask, _, _ = encode(texts, None, t5_dir, pipe.info.cfg)
    want = to_uint8(pipe.run([PromptRow(emb[i], mask[i], seed=5 + i, ssg_beta="0.5") for i in range(3)], 0.75).images)
    assert np.array_equal(z.images()[:3], want)
    im = Image.open(pngs / "000002.png")
    assert np.array_equal(np.asarray(im.convert("RGB")), want[2])
    assert "prompt='a red chair' seed=7" in im.text["var-ssg"] and "RANDOM WEIGHTS" in im.text["var-ssg"]
    assert sorted(p.name for p in pngs.iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert not list(tmp_path.glob("*.raw"))                           # the spool is gone
    # the same command again: refused without --resume, found done with it; other settings refused
    with pytest.raises(ConfigError, match="exists: pass --resume"):
        main(args)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0 and "already complete" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        main(args[:args.index("--seed") + 1] + ["6"] + args[args.index("--seed") + 2:] + ["--resume"])


def test_sweep_beta_0_against_beta_positive(t5_dir, tmp_path, capsys):
    from var_ssg.tools.commands.sweep import main
    out = tmp_path / "sw"
    out.mkdir()
    prompts = tmp_path / "two.txt"
    prompts.write_text("a cat\na red chair\n")
    prompts = str(prompts)
    assert main(SRC + ["--prompts", prompts, "--text-encoder", t5_dir, "--betas", "0;0.8", "--out-dir", str(out)]) == 0
    d = json.loads((out / "sweep.json").read_text())
    assert [(r["dse"], r["beta"], r["n_images"]) for r in d["rows"]] == [("dct", "0", 2), ("dct", "0.8", 2)]
    assert d["reference"] is None and "CLIP" in d["metrics"] and (out / "sweep.png").stat().st_size > 0
    a, b = NpzBatch(str(out / "dct_0" / "samples.npz")), NpzBatch(str(out / "dct_0.8" / "samples.npz"))
    assert a.get("prompts").tolist() == b.get("prompts").tolist() and a.settings["seed"] == b.settings["seed"]
    assert not np.array_equal(a.images(), b.images())                # SSG changed the images
    assert "FID needs a class-conditional reference" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--ref is VAR's.*CLIP score"):
        main(SRC + ["--prompts", prompts, "--text-encoder", t5_dir, "--betas", "0", "--out-dir", str(out),
                    "--ref", "ref.npz"])


def test_flags_each_family_refuses(t5_dir, prompts, tmp_path):
    from var_ssg.tools.commands.sample import main
    out = str(tmp_path / "x.npz")
    with pytest.raises(ConfigError, match="--prompts is for Infinity"):
        main(["--model", "var-d2-tiny", "--random-init", "0", "--prompts", prompts, "--out", out])
    with pytest.raises(ConfigError, match="give --prompts FILE"):
        main(SRC + ["--text-encoder", t5_dir, "--out", out])
    with pytest.raises(ConfigError, match="--per-class is VAR's.*--per-prompt"):
        main(SRC + ["--prompts", prompts, "--per-class", "3", "--text-encoder", t5_dir, "--out", out])
    with pytest.raises(ConfigError, match="--address is VAR's"):
        main(SRC + ["--prompts", prompts, "--address", "local", "--text-encoder", t5_dir, "--out", out])
    with pytest.raises(ConfigError, match="pass --text-encoder DIR"):
        main(SRC + ["--prompts", prompts, "--out", out])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="has no prompts"):
        main(SRC + ["--prompts", str(tmp_path / "empty.txt"), "--text-encoder", t5_dir, "--out", out])
    with pytest.raises(ConfigError, match="3 values for 7 scales"):
        main(SRC + ["--prompts", prompts, "--cfg-list", "1,2,3", "--text-encoder", t5_dir, "--out", out])
