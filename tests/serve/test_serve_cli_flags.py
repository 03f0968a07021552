"""`qwen-ft serve`'s flags under hostile and unusual use: every command line either passes the checks and reaches
the model load (here a stub that stops there with a marker) or ends with exit 2 and one line naming the flag (or
variable) at fault, before the load; never a traceback, never a flag silently dropped."""

from __future__ import annotations

import json
import random
import socket
import subprocess

import pytest

from _helpers import ROOT

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

LOADED = "MARKER: the model load was reached"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A (never loaded) base dir named tiny-qwen, an adapter dir (its config is all the checks read), a model dir,
    a file, a trainer's checkpoint-N and a missing path."""
    root = tmp_path_factory.mktemp("serve_flags")
    (root / "tiny-qwen").mkdir()
    (root / "tiny-qwen" / "config.json").write_text("{}")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
              "base_model_name_or_path": str(root / "tiny-qwen")}
    for d in ("ad", "run/checkpoint-20"):
        (root / d).mkdir(parents=True)
        (root / d / "adapter_config.json").write_text(json.dumps(config))
    (root / "file.txt").write_text("not a dir")
    return root


@pytest.fixture
def serve(monkeypatch, capsys, dirs):
    """Run `qwen-ft serve -m <base> ARGV` up to the load: ('loaded', stderr) or (exit code, stderr); ``model``:
    another base dir than the module's."""
    import finetune.serve.models as models

    def stop(*a, **k):
        raise RuntimeError(LOADED)

    monkeypatch.setattr(models, "load_served_model", stop)
    monkeypatch.delenv("QWEN_FT_API_KEY", raising=False)

    def run(argv, env=None, model=None):
        from finetune.cli import main

        if env is not None:
            monkeypatch.setenv("QWEN_FT_API_KEY", env)
        capsys.readouterr()
        try:
            code = main(["serve", "-m", str(model or dirs / "tiny-qwen"), *argv])
        except SystemExit as e:  # argparse's errors
            code = e.code
        except RuntimeError as e:
            assert str(e) == LOADED
            code = "loaded"
        finally:
            monkeypatch.delenv("QWEN_FT_API_KEY", raising=False)
        return code, capsys.readouterr().err

    return run


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- the regressions, one by one ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, env, message", [
    # argparse's usage text above the error (three lines) was one line only for the other commands
    (["--port", "abc"], None, "error: argument --port: invalid int value: 'abc' (see qwen-ft serve --help)"),
    (["--bogus"], None, "unknown flag --bogus (see qwen-ft serve --help)"),
    (["--max_batch", "0"], None, "--max-batch must be positive, got 0"),  # (either spelling: --max_batch was unknown)
    (["--max-bat", "2"], None, "unknown flag --max-bat (did you mean --max-batch? flags are not abbreviated)"),
    (["--query", "hi"], None, "unknown flag --query (a flag of qwen-ft chat, not of qwen-ft serve)"),
    (["--max-batch"], None, "argument --max-batch: expected one argument"),
    # argparse kept the last of a flag given twice, silently
    (["--port", "8001", "--port", "8002"], None, "--port given twice (8001 and 8002); pass it once"),
    (["-m", "/other/model"], None, "-m/--model given twice"),
    (["--api-key", "a", "--api-key", "b"], None, "--api-key given twice"),
    (["--max-batch", "4", "--max-batch", "8"], None, "--max-batch given twice"),
    # an empty host bound every interface (and the banner said http://:8000)
    (["--host", ""], None, "--host is empty (0.0.0.0 for every interface)"),
    # a host that does not resolve / no address: was "cannot listen on H:P: ..." naming no flag
    (["--host", "no-such-host.invalid"], None, "--host 'no-such-host.invalid': not an address or a host name"),
    (["--host", "999.1.1.1"], None, "--host '999.1.1.1': not an address"),
    # an empty $QWEN_FT_API_KEY was reported as an empty --api-key, a flag not given
    ([], "", "error: $QWEN_FT_API_KEY is empty (unset it to serve without a key)"),
    ([], "   ", "$QWEN_FT_API_KEY is empty"),
    ([], "key ", "$QWEN_FT_API_KEY begins or ends with white space"),  # no client could send it: 401 always
    (["--api-key", " key"], None, "--api-key begins or ends with white space"),
    (["--api-key", "a\nb"], None, "--api-key holds a control character"),
    # a capital in the origin never matched what browsers send, silently
    (["--cors-origin", "http://LOCALHOST:3000"], None, "browsers send the origin in lower case"),
    # --dtype / --device were checked by the loader, with messages naming no flag
    (["--dtype", "int3"], None, "--dtype: unknown dtype 'int3'"),
    (["--device", "tpu"], None, "--device: unknown device 'tpu'"),
    (["--device", "cuda:7"], None, "--device: device 'cuda:7'"),
    # an adapter that is a file was "has no adapter_config.json: not a PEFT adapter dir"
    (["--adapter", "x={root}/file.txt"], None, "is a file, not an adapter directory"),
])
def test_each_bad_flag_is_one_line_naming_it_before_the_load(serve, dirs, argv, env, message):
    code, err = serve([a.replace("{root}", str(dirs)) for a in argv] + ["--port", _free_port()]
                      if "--port" not in argv else argv, env)
    assert code == 2 and message in _one_line(err)


def test_a_port_in_use_is_one_line_naming_port(serve):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = serve(["--port", str(port)])
    assert code == 2 and _one_line(err) == (f"error: --port {port}: 127.0.0.1:{port} is already in use (another "
                                            "server?); pick another --port\n")


def test_an_adapter_dir_with_a_tilde_is_expanded_as_the_loader_does(serve, dirs, monkeypatch):
    monkeypatch.setenv("HOME", str(dirs))
    assert serve(["--adapter", "x=~/ad", "--port", _free_port()])[0] == "loaded"  # was "adapter ~/ad does not exist"


def test_an_ipv6_host_passes_the_check_as_uvicorn_binds_it(serve):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    # the check bound an IPv4 socket: "Address family for hostname not supported" for what uvicorn serves
    assert serve(["--host", "::1", "--port", _free_port()])[0] == "loaded"


def test_every_interface_without_a_key_warns_before_the_load_and_still_starts(serve):
    code, err = serve(["--host", "0.0.0.0", "--port", _free_port()])
    assert code == "loaded" and err.startswith("warning: --host 0.0.0.0 listens where other machines can reach it "
                                               "and no --api-key") and err.count("\n") == 1
    assert serve(["--host", "0.0.0.0", "--port", _free_port(), "--api-key", "k"]) == ("loaded", "")
    assert serve(["--host", "0.0.0.0", "--port", _free_port()], env="k") == ("loaded", "")
    assert serve(["--host", "localhost", "--port", _free_port()]) == ("loaded", "")


@pytest.mark.parametrize("argv, message", [
    (["-m"], "argument -m/--model: expected one argument"),
    (["-m", "/x", "--port"], "argument --port: expected one argument"),
    (["-m", "/x", "--adapter"], "argument -a/--adapter: expected one argument"),
])
def test_serve_sh_with_a_flag_missing_its_value(argv, message):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "serve.sh"), *argv], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == "" and message in _one_line(r.stderr)


# -- the fuzzer ----------------------------------------------------------------------------------------------

def _pools(root):
    """flag -> [(value, passes the checks)]; {port} / {busy} filled in per case."""
    ad = str(root / "ad")
    return {
        "--adapter": [(f"a={ad}", True), (f"b={root / 'run' / 'checkpoint-20'}", True), (f"org/x.y:z-1={ad}", True),
                      ("a" * 300 + f"={ad}", True), ("noequals", False), (f"={ad}", False), ("a=", False),
                      (f"my name={ad}", False), (f"é={ad}", False), (f"tiny-qwen={ad}", False),
                      (f"m={root / 'tiny-qwen'}", False), (f"f={root / 'file.txt'}", False),
                      (f"g={root / 'missing'}", False), ("h=/", False)],
        "--port": [("{port}", True), ("0", False), ("-1", False), ("65536", False), ("eighty", False),
                   ("{busy}", False), ("", False)],
        "--host": [("127.0.0.1", True), ("localhost", True), ("0.0.0.0", True), ("", False), ("300.1.1.1", False),
                   ("no-such-host.invalid", False), ("192.0.2.1", False)],
        "--max-batch": [("1", True), ("32", True), ("512", True), (str(10 ** 12), False), ("0", False), ("-4", False),
                        ("1.5", False), ("", False)],
        "--max-queue": [("0", True), (str(10 ** 15), True), ("-1", False), ("x", False)],
        "--prefill-chunk": [("0", True), ("512", True), ("-1", False), ("1.5", False), ("", False)],
        "--max-stored-responses": [("0", True), ("5", True), ("-1", False), ("lots", False)],
        "--max-model-len": [("2", True), (str(10 ** 12), True), ("1", False), ("0", False), ("-5", False)],
        "--api-key": [("k", True), ("s3cr3t-ключ", True), ("", False), ("  ", False), (" k", False),
                      ("a\tb", False)],
        "--cors-origin": [("*", True), ("http://localhost:3000", True), ("https://a.example", True), ("", False),
                          ("null", False), ("http://a/", False), ("localhost:3000", False), ("HTTP://A", False)],
        "--log-level": [("info", True), ("WARNING", True), ("bogus", False)],
        "--dtype": [("bf16", True), ("fp32", True), ("int3", False)],
        "--device": [("cpu", True), ("tpu", False)],
        "--bogus": [(None, False)],
    }


REPEATABLE = ("--adapter", "--cors-origin")


def test_fuzz_flags_either_reach_the_load_or_stop_with_one_line_naming_the_flag(serve, dirs):
    pools = _pools(dirs)
    rng = random.Random(20261205)
    outcomes = {"loaded": 0, 2: 0}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for case in range(300):
            argv, ok, names, given = [], True, set(), set()
            for _ in range(rng.randint(0, 5)):
                flag = rng.choice(list(pools))
                value, good = rng.choice(pools[flag])
                if flag in given and flag not in REPEATABLE:
                    good = False  # given twice: refused
                if flag == "--adapter" and good:
                    name = value.partition("=")[0]
                    good = name not in names
                    names.add(name)
                given.add(flag)
                ok &= good
                value = None if value is None else value.format(port=_free_port(), busy=busy.getsockname()[1])
                argv += [flag] if value is None else [flag, value]
            env = rng.choice([None, None, None, "k", ""])
            ok &= env != "" or "--api-key" in given
            if "--port" not in given:
                argv += ["--port", _free_port()]
            code, err = serve(argv, env)
            where = f"case {case}: {argv} env={env!r}"
            outcomes[code] += 1
            if ok:
                assert code == "loaded", f"{where}: {err}"
                assert err == "" or (err.startswith("warning: --host") and err.count("\n") == 1), f"{where}: {err}"
            else:
                assert code == 2, f"{where}: reached the load"
                line = _one_line(err)
                assert "--" in line or "$QWEN_FT_API_KEY" in line or "adapter " in line, f"{where}: {line}"
    assert min(outcomes.values()) >= 30, outcomes  # both sides of the checks were exercised



def test_an_adapter_given_as_a_hub_id_is_fetched_before_the_model_loads(serve, dirs, tmp_path, monkeypatch):
    """`--adapter NAME=org/adapter` was "adapter org/adapter does not exist": serve read the config from the
    given string before the loader (which fetches hub ids, as chat does) ever saw it. An id that cannot be
    fetched is one line naming it."""
    import huggingface_hub

    import finetune.serve.models as models

    fetched, loads = [], []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, **k: fetched.append(ref) or str(dirs / "ad"))

    def stop(model, adapters, **k):
        loads.append(adapters)
        raise RuntimeError(LOADED)

    monkeypatch.setattr(models, "load_served_model", stop)
    monkeypatch.chdir(tmp_path)  # (no local org/ dir)
    assert serve(["--adapter", "sup=org/support-adapter", "--port", _free_port()])[0] == "loaded"
    assert fetched == ["org/support-adapter"] and loads == [[("sup", str(dirs / "ad"))]]

    def offline(ref, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, err = serve(["--adapter", "sup=org/other", "--port", _free_port()])
    assert code == 2 and "org/other is not a local directory and could not be fetched" in _one_line(err)


@pytest.mark.parametrize("gen, expected", [
    ({"num_beams": 2}, "num_beams=2: the server's decode engine does not implement this option; remove it"),
    ({"num_beams": 2, "no_repeat_ngram_size": 3}, "no_repeat_ngram_size=3, num_beams=2: the server's decode engine "
                                                  "does not implement these options; remove them"),
    ({"max_new_tokens": 512, "max_length": 10}, None),  # generate() ignores max_length beside max_new_tokens
])
def test_generation_options_the_engine_lacks_stop_serve_before_the_load(serve, tmp_path, gen, expected):
    """Every request failed with a 500 on them (the engine refused them request by request)."""
    base = tmp_path / "beams-qwen"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "generation_config.json").write_text(json.dumps(dict({"do_sample": False}, **gen)))
    code, err = serve(["--port", _free_port()], model=base)
    if expected is None:
        assert code == "loaded", err
    else:
        assert code == 2 and f"generation_config.json: {expected}" in _one_line(err)


def test_a_max_model_len_past_what_the_model_holds_stops_serve_before_the_load(serve, tmp_path):
    """--max-model-len up to max(max_position_embeddings, 4 x seq_length) of config.json reaches the load; more is
    one line before it (as chat and eval refuse such a --max-new-tokens): 100,000,000 was taken, and a request that
    long asked the KV cache for more than any device holds."""
    base = tmp_path / "long-qwen"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen", "max_position_embeddings": 8192,
                                                  "seq_length": 2048}))
    assert serve(["--port", _free_port(), "--max-model-len", "8192"], model=base)[0] == "loaded"
    code, err = serve(["--port", _free_port(), "--max-model-len", "100000000"], model=base)
    assert code == 2 and "--max-model-len 100000000 is more than the model holds (at most 8192" in _one_line(err)


def test_an_adapter_merged_into_the_served_model_stops_serve_before_the_load(serve, dirs, tmp_path):
    """The adapter's recorded base is checked against -m before the weights load (it was checked only by the load):
    the model `qwen-ft merge` made from this adapter (its merge_report.json) is one line, as chat and eval have it."""
    merged = tmp_path / "merged-qwen"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "merge_report.json").write_text(json.dumps({"adapter_merged": {"path": str((dirs / "ad").resolve()),
                                                                             "weights": None}}))
    code, err = serve(["--port", _free_port(), "--adapter", f"a={dirs / 'ad'}"], model=merged)
    assert code == 2 and "already merged into it" in _one_line(err), err
    assert serve(["--port", _free_port(), "--adapter", f"a={dirs / 'ad'}"])[0] == "loaded"


def test_a_max_model_len_too_short_for_any_prompt_stops_serve_before_the_load(serve, tiny_model_dir):
    """--max-model-len 8 started a server that answered every request with a 400 (the ChatML frame of the shortest
    prompt, an empty system and user message, is longer): one line naming the least usable value, measured with the
    model dir's tokenizer as requests are; that value reaches the load."""
    from finetune import load_tokenizer
    from finetune.modeling import make_context

    least = len(make_context(load_tokenizer(tiny_model_dir), "", history=[], system="")[1]) + 1
    code, err = serve(["--port", _free_port(), "--max-model-len", "8"], model=tiny_model_dir)
    assert code == 2 and (f"--max-model-len 8 leaves no room for a reply to any request: the shortest prompt (an "
                          f"empty system and user message) is {least - 1} tokens, so the least usable value is "
                          f"{least}") in _one_line(err)
    code, err = serve(["--port", _free_port(), "--max-model-len", str(least - 1)], model=tiny_model_dir)
    assert code == 2 and f"the least usable value is {least}" in _one_line(err)
    assert serve(["--port", _free_port(), "--max-model-len", str(least)], model=tiny_model_dir)[0] == "loaded"


# -- without -m: the base the adapters record, as `qwen-ft chat -a DIR` takes it ---------------------------------

def _serve_without_model(argv, monkeypatch, capsys):
    """`qwen-ft serve ARGV` (no -m) up to the load: (exit code or the model dir the load was given, stderr)."""
    import finetune.serve.models as models
    from finetune.cli import main

    def stop(model_dir, *a, **k):
        raise RuntimeError(LOADED, model_dir)

    monkeypatch.setattr(models, "load_served_model", stop)
    monkeypatch.delenv("QWEN_FT_API_KEY", raising=False)
    capsys.readouterr()
    try:
        code = main(["serve", *argv, "--port", _free_port()])
    except RuntimeError as e:
        assert e.args[0] == LOADED
        code = e.args[1]
    return code, capsys.readouterr().err


def test_without_model_the_adapters_recorded_base_is_served(dirs, monkeypatch, capsys):
    loaded, err = _serve_without_model(["--adapter", f"mine={dirs / 'ad'}", "-a", f"other={dirs / 'ad'}"],
                                       monkeypatch, capsys)
    assert str(loaded) == str(dirs / "tiny-qwen")
    assert err == f"serve: the base model is {dirs / 'tiny-qwen'}, which the adapters record\n"


def test_without_model_or_adapter_is_one_line_saying_what_to_give(monkeypatch, capsys):
    code, err = _serve_without_model([], monkeypatch, capsys)
    assert code == 2 and _one_line(err) == ("error: -m/--model is required (the base model dir or hub id), unless "
                                            "--adapter NAME=DIR is given: then the base is the one the adapter "
                                            "records\n")


def test_without_model_adapters_of_different_bases_are_one_line_naming_each(dirs, tmp_path, monkeypatch, capsys):
    (tmp_path / "base2").mkdir()
    (tmp_path / "base2" / "config.json").write_text("{}")
    (tmp_path / "ad2").mkdir()
    config = json.loads((dirs / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad2" / "adapter_config.json").write_text(
        json.dumps(dict(config, base_model_name_or_path=str(tmp_path / "base2"))))
    code, err = _serve_without_model(["-a", f"one={dirs / 'ad'}", "-a", f"two={tmp_path / 'ad2'}"], monkeypatch,
                                     capsys)
    assert code == 2 and "the adapters record different base models (one on " in _one_line(err)
    assert f"two on {tmp_path / 'base2'}" in err and "give it with -m/--model" in err


def test_without_model_a_missing_adapter_is_one_line(dirs, monkeypatch, capsys):
    code, err = _serve_without_model(["-a", f"x={dirs / 'nope'}"], monkeypatch, capsys)
    assert code == 2 and "nope" in _one_line(err)
