"""Serving Infinity artifacts (serving/prompts.py): prompt requests parsed and checked without Ray
(empty, too long for the text length, wrong types → 400 with what to fix), the options refused
before Ray starts, then one Ray instance in this process serving infinity-tiny (batch 4, a local
tiny T5) on 127.0.0.1: two concurrent prompts batched together and equal to the pipeline run
directly, a third aspect ratio run as its own batch, a bad request 400, nothing left behind."""
import contextlib
import json
import shutil
import tempfile

import numpy as np
import pytest

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.infinity_config import get_infinity_preset
from tests.test_infinity_export import _t5
from tests.test_serve import concurrently, descendants, free_port, http, png, wait_gone

TINY = "infinity-tiny"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _t5(tmp_path_factory.mktemp("t5") / "t5", get_infinity_preset(TINY).text_dim)


@pytest.fixture(scope="module")
def inf_art(tmp_path_factory):
    """infinity-tiny exported for batch 4 (random weights, seed 0)."""
    from var_ssg.tools.commands.export import main
    out = str(tmp_path_factory.mktemp("inf") / "art")
    assert main(["--model", TINY, "--random-init", "0", "--batch", "4", "--out", out]) == 0
    return out


class _Info:
    """What the Frontend's checker reads: the config and the baked transform."""
    def __init__(self):
        from var_ssg.runtime.backends.base import InfinityInfo
        self.info = InfinityInfo(name="onnxruntime", cfg=get_infinity_preset(TINY), transform="dct", batch=2)


def _parse(body, tok):
    from var_ssg.serving.prompts import parse_prompt_request, prompt_checker
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return parse_prompt_request(body, prompt_checker(_Info().info), tok)


LONG = " ".join(["cat"] * 40)          # 41 tokens with </s>; infinity-tiny reads 32


@pytest.mark.parametrize("body,msg", [
    ({"prompt": "", "seed": 0}, "'prompt' is empty"),
    ({"prompt": "   ", "seed": 0}, "'prompt' is empty"),
    ({"prompt": 7, "seed": 0}, "'prompt' must be a string"),
    ({"prompt": ["a cat"], "seed": 0}, "'prompt' must be a string"),
    ({"prompt": LONG, "seed": 0}, "41 tokens long; this model reads at most 32"),
    ({"prompt": "a cat", "seed": 0, "negative_prompt": LONG}, "'negative_prompt' is 41 tokens"),
    ({"prompt": "a cat", "seed": 0, "negative_prompt": ""}, "leave it out"),
    ({"seed": 0}, "missing 'prompt'"),
    ({"prompt": "a cat"}, "missing 'seed'"),
    ({"prompt": "a cat", "seed": "0"}, "'seed' must be an integer"),
    ({"prompt": "a cat", "seed": -1}, "seed must be an integer in 0.."),
    ({"class": 207, "seed": 0}, "these artifacts are Infinity"),
    ({"prompt": "a cat", "seed": 0, "aspect_ratio": "wide"}, "malformed aspect ratio"),
    ({"prompt": "a cat", "seed": 0, "aspect_ratio": [3, 4]}, "'aspect_ratio' must be"),
    ({"prompt": "a cat", "seed": 0, "cfg": [1, 2]}, "'cfg': 2 values for 7 scales"),
    ({"prompt": "a cat", "seed": 0, "tau": "hot"}, "'tau' must be a number"),
    ({"prompt": "a cat", "seed": 0, "ssg_beta": "1,2"}, "6 values"),
    (b"[1]", "must be a JSON object"),
    (b"{", "malformed JSON"),
])
def test_bad_prompt_request_is_400_with_what_to_fix(t5_dir, body, msg):
    from var_ssg.serving.requests import RequestError, load_tokenizer
    with pytest.raises(RequestError) as e:
        _parse(body, load_tokenizer(t5_dir))
    assert e.value.status == 400 and msg in str(e.value), str(e.value)


def test_good_prompt_requests_and_schedule_groups(t5_dir):
    from var_ssg.serving.prompts import schedule_groups
    from var_ssg.serving.requests import load_tokenizer
    tok = load_tokenizer(t5_dir)
    a = _parse({"prompt": "a cat", "seed": 3}, tok)
    assert (a.prompt, a.negative_prompt, a.template, a.row.seed, a.row.cfg, a.row.text) == ("a cat", None, 1.0, 3, 3.0, None)
    b = _parse({"prompt": "a red chair", "seed": 4, "aspect_ratio": "3:4", "negative_prompt": "dog",
                "cfg": [1, 2, 3, 3, 3, 3, 3], "tau": 0.9, "ssg_beta": [0.5] * 6, "top_k": 1, "top_p": 0}, tok)
    assert (b.template, b.negative_prompt, b.row.cfg, b.row.ssg_beta, b.row.top_k) == (
        0.75, "dog", (1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0), (0.5,) * 6, 1)
    c = _parse({"prompt": "a dog", "seed": 5, "aspect_ratio": 1.02}, tok)       # the nearest template: 1:1
    assert schedule_groups([a, b, c]) == [[0, 2], [1]]


@pytest.mark.slow
def test_options_refused_before_ray_starts(inf_art, artifacts, t5_dir, tmp_path, capsys):
    from var_ssg.serving.requests import ServeOptions, preflight
    with pytest.raises(ConfigError, match="pass --text-encoder DIR"):
        preflight(ServeOptions(artifacts=inf_art))
    with pytest.raises(ConfigError, match="has no TensorRT engines .exported without --target trt."):
        preflight(ServeOptions(artifacts=inf_art, backend="tensorrt", device="cuda", text_encoder=t5_dir))
    with pytest.raises(ConfigError, match="cannot load its tokenizer"):
        preflight(ServeOptions(artifacts=inf_art, text_encoder=str(tmp_path)))
    wide = _t5(tmp_path / "wide", 64)
    with pytest.raises(ConfigError, match="width 64; infinity-tiny takes 256"):
        preflight(ServeOptions(artifacts=inf_art, text_encoder=wide))
    with pytest.raises(ConfigError, match="--text-encoder is for Infinity artifacts"):
        preflight(ServeOptions(artifacts=artifacts(batch=4), text_encoder=t5_dir))
    # scripts/serve.py: one `error:` line, exit 2, no Ray process
    import os
    import sys
    from var_ssg.tools.cli import run_main
    from var_ssg.tools.commands import serve
    before = set(descendants(os.getpid()))
    capsys.readouterr()
    for flags, msg in (([], "pass --text-encoder DIR"), (["--text-encoder", wide], "width 64"),
                       (["--text-encoder", t5_dir, "--session-cache"], "--session-cache is for VAR")):
        with pytest.raises(SystemExit, match="^2$"):
            run_main(lambda: serve.main(["--artifacts", inf_art, *flags]))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert set(descendants(os.getpid())) <= before
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()


@pytest.fixture(scope="module")
def ray_home():
    pytest.importorskip("ray.serve")      # the session's own $HOME for Ray: tests/conftest.py


@pytest.fixture(scope="module")
def server(inf_art, t5_dir, ray_home):
    from var_ssg.serving.launch import LaunchConfig, running
    from var_ssg.serving.requests import ServeOptions, code_path
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")           # short: Ray's socket paths must fit
    opts = ServeOptions(artifacts=inf_art, text_encoder=t5_dir, max_batch_wait_ms=1000, max_queue=8,
                        pythonpath=code_path())
    launch = LaunchConfig(host="127.0.0.1", port=port, num_cpus=2, temp_dir=tmp)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(running(opts, launch))
        yield dict(port=port, stack=stack)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_prompts_batched_by_schedule_equal_to_the_pipeline_and_a_bad_one_400(server, inf_art, t5_dir):
    from var_ssg.runtime.images import to_uint8
    from var_ssg.runtime.infinity import PromptRow, open_infinity
    from var_ssg.tools.infinity_cli import encode
    port = server["port"]
    status, _, body = http("GET", port, "/v1/model")
    d = json.loads(body)
    assert status == 200 and (d["model"], d["family"], d["batch"], d["text_maxlen"]) == (TINY, "infinity", 4, 32)
    reqs = [dict(prompt="a cat on the chair", seed=11), dict(prompt="a red tree", seed=12, negative_prompt="dog"),
            dict(prompt="a blue dog", seed=13, aspect_ratio="3:4")]
    got = concurrently(lambda r: http("POST", port, "/v1/generate", r), [(r,) for r in reqs])
    assert [s for s, _, _ in got] == [200] * 3, [(s, b[:300]) for s, _, b in got]
    h = [g[1] for g in got]
    # the two 1:1 prompts share one pipeline run, the 3:4 one runs alone (its own schedule)
    assert h[0]["x-batch-id"] == h[1]["x-batch-id"] != h[2]["x-batch-id"], h
    assert [x["x-batch-size"] for x in h] == ["2", "2", "1"] and h[0]["x-batch-capacity"] == "4"
    # each image is its request's: the same pixels as the pipeline run directly on the same rows
    pipe, _ = open_infinity(artifacts=inf_art)
    cfg = pipe.info.cfg
    emb, mask, _, _ = encode([r["prompt"] for r in reqs], None, t5_dir, cfg)
    nemb, nmask, _, _ = encode(["dog"], None, t5_dir, cfg)
    rows = [PromptRow(emb[i], mask[i], seed=r["seed"]) for i, r in enumerate(reqs)]
    rows[1] = PromptRow(emb[1], mask[1], seed=12, neg_text=nemb[0], neg_mask=nmask[0])
    want = list(to_uint8(pipe.run(rows[:2], 1.0).images)) + list(to_uint8(pipe.run(rows[2:], 0.75).images))
    for r, (_, _, body), w in zip(reqs, got, want):
        pixels, note = png(body)
        assert pixels.shape == w.shape and np.array_equal(pixels, w), r
        assert f"prompt={r['prompt']!r} seed={r['seed']}" in note and "RANDOM WEIGHTS" in note
    assert pixels.shape == (60, 80, 3)                                # 3:4 is 60 x 80 at 0.06M
    status, hb, out = http("POST", port, "/v1/generate", {"prompt": "", "seed": 0})
    assert status == 400 and hb["content-type"] == "application/json" and "'prompt' is empty" in json.loads(out)["error"]
    status, _, out = http("POST", port, "/v1/generate", {"prompt": LONG, "seed": 0})
    assert status == 400 and "at most 32 tokens" in json.loads(out)["error"]


@pytest.mark.slow
def test_shutdown_leaves_no_process(server):
    import os
    children = descendants(os.getpid())
    server["stack"].close()
    left = wait_gone(children)
    assert children and not left, f"processes left behind: {left}"
