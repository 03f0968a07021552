"""`qwen-ft chat`: one-shot --query in a subprocess, scripts/chat.sh, and the interactive mode driven through a
pseudo-terminal (type a question, read the streamed answer, :clear, :exit)."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

import finetune  # noqa: F401
from finetune.demo import make_demo_model

from _helpers import ROOT, MEMORISE, write_memorise, train_adapter, subprocess_env







@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    fl = make_demo_model(root / "float")
    data = write_memorise(root / "mem.json")
    return {"float": fl, "lora": train_adapter(fl, data, root / "lora", 50)}


def test_query_mode_subprocess(setup):
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "chat", "-m", str(setup["float"]), "--adapter",
                        str(setup["lora"]), "--query", MEMORISE[2][0], "--greedy", "--max_new_tokens", "24"],
                       capture_output=True, text=True, env=subprocess_env(TERM="dumb"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == MEMORISE[2][1]  # the reply alone: scriptable


def test_chat_sh_wrapper_uses_recorded_base(setup):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "chat.sh"), "-a", str(setup["lora"]), "--query",
                        MEMORISE[0][0], "--greedy"], capture_output=True, text=True, env=subprocess_env(TERM="dumb"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == MEMORISE[0][1]


def test_query_mode_bad_adapter_is_a_clear_error(tmp_path, capsys):
    from finetune.cli import main

    assert main(["chat", "--adapter", str(tmp_path / "nope"), "--query", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "nope") in err
    assert main(["chat", "--query", "hi"]) == 2  # neither a model nor an adapter


def test_a_leading_tilde_in_the_adapter_flag_is_the_home_dir(setup, tmp_path, monkeypatch, capsys):
    # the shell leaves --adapter=~/x as it is: "adapter ~/lora does not exist", where ~/lora was the adapter
    import shutil

    from finetune.cli import main

    shutil.copytree(setup["lora"], tmp_path / "home" / "lora")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["chat", "--adapter=~/lora", "--query", MEMORISE[2][0], "--greedy", "--max_new_tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == MEMORISE[2][1]


def test_chat_takes_an_adapters_hub_id_without_a_model(setup, tmp_path, capsys, monkeypatch):
    """`chat --adapter org/name` without -m read the adapter's config from a path never fetched: "adapter org/name
    does not exist", where -m BASE --adapter org/name, eval and merge fetched it. A missing local dir is named with
    the dirs beside it, as with -m."""
    import huggingface_hub

    from finetune.cli import main

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda ref, **k: fetched.append(ref) or str(setup["lora"]))
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--adapter", "org/memorised", "--query", MEMORISE[0][0], "--greedy"]) == 0
    assert fetched == ["org/memorised"] and capsys.readouterr().out.strip() == MEMORISE[0][1]
    (tmp_path / "runs" / "demo-qlora").mkdir(parents=True)
    missing = tmp_path / "runs" / "my-adapter"
    assert main(["chat", "--adapter", str(missing), "--query", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: adapter directory {missing} does not exist ({missing.parent}/ holds: demo-qlora)")


def test_a_missing_adapter_beside_a_good_model_is_named_as_the_adapter(setup, tmp_path, capsys):
    from finetune.cli import main

    assert main(["chat", "-m", str(setup["float"]), "--adapter", str(tmp_path / "nope"), "--query", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: adapter directory {tmp_path / 'nope'} does not exist ({tmp_path}/ holds no directories)"


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),  # (it sampled at random)
    (["--repetition-penalty", "inf"], "--repetition-penalty must be a finite number > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "-2"], "--top-k must be an integer >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
    (["--history-window", "0"], "--history-window must be at least 1"),
    (["--seed", "-5"], "--seed must be in [0, 2**32)"),  # set_seed's numpy traceback after the model loaded
    (["--seed", str(2 ** 32)], "--seed must be in [0, 2**32)"),
])
def test_sampling_flags_out_of_range_are_one_line_before_loading(tmp_path, capsys, monkeypatch, flags, message):
    import finetune.chat
    from finetune.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(finetune.chat, "load", no_load)
    assert main(["chat", "-m", str(tmp_path), "--query", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("temperature", ["0", "1e-40"])  # 1e-40 would overflow the scores: greedy too
def test_temperature_below_a_hundredth_is_greedy(setup, temperature):
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "chat", "-a", str(setup["lora"]), "--query",
                        MEMORISE[1][0], "--temperature", temperature],
                       capture_output=True, text=True, env=subprocess_env(TERM="dumb"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == MEMORISE[1][1]


class Pty:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=subprocess_env(TERM="dumb"), close_fds=True)
        os.close(slave)
        self.buf = ""

    def expect(self, text, timeout=90.0):
        end = time.time() + timeout
        while text not in self.buf:
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"did not see {text!r}; got {self.buf[-2000:]!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"EOF before {text!r}; got {self.buf[-2000:]!r}")
                self.buf += data.decode("utf-8", "replace")
        i = self.buf.index(text) + len(text)
        before, self.buf = self.buf[:i], self.buf[i:]
        return before

    def send(self, line):
        os.write(self.master, (line + "\n").encode())

    def close(self):
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_interactive_through_a_pty(setup):
    from finetune.chat import ANSWER, PROMPT

    t = Pty([sys.executable, "-m", "finetune.cli", "chat", "-m", str(setup["float"]), "--adapter",
             str(setup["lora"]), "--greedy", "--max_new_tokens", "24"])
    try:
        t.expect(PROMPT)
        t.send(MEMORISE[1][0])
        t.expect(ANSWER)
        answer = t.expect(PROMPT)
        assert MEMORISE[1][1] in answer, answer
        t.send(":clear")
        assert "history cleared" in t.expect(PROMPT)
        t.send(MEMORISE[3][0])
        t.expect(ANSWER)
        assert MEMORISE[3][1] in t.expect(PROMPT)
        t.send(":exit")
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


def test_stream_and_history_window(setup):
    import io

    from finetune import load_model, load_tokenizer
    from finetune.chat import stream_reply, trim_history

    model = load_model(None, adapter=setup["lora"])
    tok = load_tokenizer(setup["float"])
    out = io.StringIO()
    reply = stream_reply(model, tok, MEMORISE[0][0], [], "You are a helpful assistant.", out, do_sample=False,
                         max_new_tokens=24)
    assert reply == MEMORISE[0][1] and out.getvalue() == reply + "\n"
    history = [(q, a) for q, a in MEMORISE]
    assert trim_history(tok, history, "You are a helpful assistant.", 6144) == history
    kept = trim_history(tok, history, "You are a helpful assistant.", 60)
    assert 0 < len(kept) < len(history) and kept == history[-len(kept):]  # newest turns kept


def _session(model, tok, lines, flags=()):
    import io

    from finetune.chat import _parser, interactive

    out = io.StringIO()
    args = _parser().parse_args(["-m", "unused", *flags])
    assert interactive(model, tok, args, stdin=io.StringIO("".join(line + "\n" for line in lines)), out=out) == 0
    return out.getvalue()


def test_ctrl_c_at_the_prompt_ends_the_chat_with_130_and_ctrl_d_with_0(setup):
    """Ctrl-C at the prompt ended the chat with status 0, as Ctrl-D does: now 130, the status Ctrl-C gives every
    qwen-ft command, quietly (a new line after the prompt, no traceback)."""
    import io

    from finetune import load_model, load_tokenizer
    from finetune.chat import PROMPT, _parser, interactive

    class CtrlC(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    args = _parser().parse_args(["-m", "unused", "--greedy"])
    out = io.StringIO()
    assert interactive(model, tok, args, stdin=CtrlC(), out=out) == 130
    assert out.getvalue().endswith(PROMPT + "\n")
    assert interactive(model, tok, args, stdin=io.StringIO(""), out=io.StringIO()) == 0  # Ctrl-D: end of input


def test_the_official_demos_commands(setup):
    """:help, :history, :conf (checked as the flags are, all or nothing), :reset-conf, :seed, :clh; an unknown
    ':' line is a message, as in the official cli_demo."""
    from finetune import load_model, load_tokenizer
    from finetune.chat import ANSWER, PROMPT

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    text = _session(model, tok, [":h", MEMORISE[0][0], ":his", ":conf top_p=1.5 top_k=3", ":conf top_k=-2",
                                 ":conf greedy=no top_k=3 max_new_tokens=5", ":conf nope=1", ":seed", ":seed 9",
                                 ":seed x", ":seed -1", ":reset-conf", ":clh", ":history", ":hello", ":q",
                                 "never read"],
                    ["--greedy", "--max_new_tokens", "24"])
    replies = text.split(PROMPT)
    assert ":conf KEY=VALUE" in replies[1]  # the help
    assert replies[2].strip() == ANSWER + MEMORISE[0][1]
    assert replies[3].strip() == f"User[0]: {MEMORISE[0][0]}\nQwen[0]: {MEMORISE[0][1]}"
    assert replies[4].strip() == "(top_p must be in (0, 1], got 1.5; nothing changed)"  # top_k=3 not applied
    assert replies[5].strip() == "(top_k must be an integer >= 0 (0: off), got -2; nothing changed)"
    assert "top_k=3" in replies[6] and "max_new_tokens=5" in replies[6] and "greedy=False" in replies[6]
    assert "KEY one of" in replies[7] and "'nope=1'" in replies[7]
    # (a seed outside numpy's range used to end the session with set_seed's traceback at the next reply)
    assert [r.strip() for r in replies[8:12]] == [
        "(seed unset: each reply draws afresh)", "(seed 9)",
        "(:seed takes a whole number in [0, 2**32), got 'x'; the seed stays 9)",
        "(:seed takes a whole number in [0, 2**32), got '-1'; the seed stays 9)"]
    # the command line's settings again, its seed (none) too
    assert "top_k=default" in replies[12] and "max_new_tokens=24" in replies[12] and "seed=unset" in replies[12]
    assert replies[13].strip() == "(history cleared)" and replies[14].strip() == "(no history)"
    assert replies[15].startswith(ANSWER)  # ':hello' went to the model
    assert len(replies) == 17 and "never read" not in text  # :q left
    # the official name, :clear-history, was sent to the model as a question
    replies = _session(model, tok, [MEMORISE[0][0], ":clear-history", ":history"],
                       ["--greedy", "--max_new_tokens", "24"]).split(PROMPT)
    assert replies[2].strip() == "(history cleared)" and replies[3].strip() == "(no history)"


def test_conf_refuses_greedy_beside_a_sampling_setting_or_a_seed(setup):
    """As --greedy with --top-p or --seed is refused: :conf top_p=0.5 then :conf greedy=1 left both in effect (the
    top_p ignored, unsaid). Either order is one line, the settings unchanged; unsetting the other one first (or in
    the same :conf) is the way through, and :seed N under greedy is refused as --greedy --seed is."""
    from finetune import load_model, load_tokenizer
    from finetune.chat import PROMPT

    model, tok = load_model(setup["float"]), load_tokenizer(setup["float"])
    replies = [r.strip() for r in _session(model, tok, [
        ":conf top_p=0.5", ":conf greedy=1", ":conf", ":conf greedy=1 top_p=none",
        ":conf greedy=1 top_p=none seed=none", ":conf top_k=3", ":seed 4", ":conf do_sample=yes", ":seed 4",
        ":conf greedy=yes", ":reset-conf", ":q"],
        ["--seed", "7"]).split(PROMPT)[1:-1]]
    assert replies[0] == replies[2]  # greedy=1 changed nothing
    assert "top_p=0.5" in replies[0] and "greedy=False" in replies[0] and "seed=7" in replies[0]
    assert replies[1] == ("(greedy does not sample, so top_p 0.5, seed 7 would be ignored: unset them (top_p=none, "
                          "seed=none) or sample (greedy=no); nothing changed)")
    assert replies[3] == ("(greedy does not sample, so seed 7 would be ignored: unset it (seed=none) or sample "
                          "(greedy=no); nothing changed)")
    assert "greedy=True" in replies[4] and "top_p=default" in replies[4] and "seed=unset" in replies[4]
    assert replies[5] == ("(greedy does not sample, so top_k 3 would be ignored: unset it (top_k=none) or sample "
                          "(greedy=no); nothing changed)")
    assert replies[6] == ("(greedy does not sample, so seed 4 would be ignored: sample first (:conf greedy=no); the "
                          "seed stays unset)")
    assert "greedy=False" in replies[7] and replies[8] == "(seed 4)"
    assert replies[9] == ("(greedy does not sample, so seed 4 would be ignored: unset it (seed=none) or sample "
                          "(greedy=no); nothing changed)")
    assert "greedy=False" in replies[10] and "top_p=default" in replies[10] and "seed=7" in replies[10]  # the flags'
    # a temperature below 0.01 is greedy itself, and passes beside --greedy (as on the command line)
    replies = [r.strip() for r in _session(model, tok, [":conf temperature=0.5", ":conf temperature=0", ":q"],
                                           ["--greedy"]).split(PROMPT)[1:-1]]
    assert replies[0] == ("(greedy does not sample, so temperature 0.5 would be ignored: unset it (temperature=none) "
                          "or sample (greedy=no); nothing changed)")
    assert "temperature=0.0" in replies[1] and "greedy=True" in replies[1]
    # without --greedy, a greedy temperature refuses a seed too, and names the temperature as the way out
    replies = [r.strip() for r in _session(model, tok, [":seed 4", ":conf top_p=0.5", ":q"],
                                           ["--temperature", "0"]).split(PROMPT)[1:-1]]
    assert replies[0] == ("(greedy does not sample, so seed 4 would be ignored: sample first (:conf temperature=0.01 "
                          "or more); the seed stays unset)")
    assert replies[1] == ("(greedy does not sample, so top_p 0.5 would be ignored: unset it (top_p=none) or sample "
                          "(temperature=0.01 or more); nothing changed)")
    # --greedy beside a greedy temperature: sampling takes both changed (greedy=no alone was refused again)
    replies = [r.strip() for r in _session(model, tok, [":seed 4", ":q"],
                                           ["--greedy", "--temperature", "0.005"]).split(PROMPT)[1:-1]]
    assert replies[0] == ("(greedy does not sample, so seed 4 would be ignored: sample first (:conf greedy=no and "
                          "temperature=0.01 or more); the seed stays unset)")


@pytest.mark.parametrize("word, said", [
    ("top_k=1.5", "(top_k: '1.5' is not a whole number; nothing changed)"),
    ("max_new_tokens=2e3", "(max_new_tokens: '2e3' is not a whole number; nothing changed)"),
    ("temperature=warm", "(temperature: 'warm' is not a number; nothing changed)"),
    ("greedy=maybe", "(greedy: 'maybe' is not a yes/no value; nothing changed)"),
])
def test_a_conf_value_of_the_wrong_kind_names_the_kind(word, said):
    """:conf top_k=1.5 said that '1.5' is not a number."""
    from finetune.chat import _parser, change_conf

    conf = _parser().parse_args(["-m", "unused"])
    assert change_conf(conf, [word]) == said
    assert conf == _parser().parse_args(["-m", "unused"])  # nothing changed


@pytest.mark.parametrize("words, said", [
    (["top_p=0.5", "top_p=0.9"], "(top_p given twice; nothing changed)"),
    (["greedy=yes", "do_sample=yes"], "(do_sample and greedy set the same thing; nothing changed)"),
    (["history_window=3", "max_window_size=4"], "(max_window_size and history_window set the same thing; nothing "
                                                "changed)"),
])
def test_a_conf_setting_given_twice_is_refused(words, said):
    """:conf top_p=0.5 top_p=0.9 kept the last value without a word (and greedy=yes do_sample=yes sampled)."""
    from finetune.chat import _parser, change_conf

    conf = _parser().parse_args(["-m", "unused"])
    assert change_conf(conf, words) == said
    assert conf == _parser().parse_args(["-m", "unused"])  # nothing changed


def test_more_new_tokens_than_the_model_holds_is_refused(setup, capsys, monkeypatch):
    """--max-new-tokens past max(max_position_embeddings, 4 x seq_length) (1024 for the demo model) is one line before
    the weights load, as eval and the server refuse it; generate() ran on past the window for as long as asked."""
    import finetune.loading
    from finetune import load_model, load_tokenizer
    from finetune.chat import PROMPT
    from finetune.cli import main

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    text = _session(model, tok, [":conf max_new_tokens=1025", ":conf max_new_tokens=1024", ":q"], ["--greedy"])
    replies = text.split(PROMPT)
    assert replies[1].strip() == ("(max_new_tokens 1025 is more than the model holds (at most 1024: "
                                  "max(max_position_embeddings, 4 x seq_length) of its config.json); nothing changed)")
    assert "max_new_tokens=1024" in replies[2]

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before --max-new-tokens was checked")

    monkeypatch.setattr(finetune.loading, "load_model", no_load)
    capsys.readouterr()  # (the load above: its progress bar)
    assert main(["chat", "-a", str(setup["lora"]), "--query", "hi", "--max-new-tokens", "100000000"]) == 2
    assert capsys.readouterr().err == (f"error: --max-new-tokens 100000000 is more than {setup['float']} holds (at "
                                       "most 1024: max(max_position_embeddings, 4 x seq_length) of its config.json)\n")


def test_chat_checks_a_base_models_hub_id_before_loading_as_a_local_dir(setup, capsys, monkeypatch):
    """`-m org/name` without an adapter skipped the new-token check (it reads a local dir's config): generate() was
    left to run past the model's positions."""
    import huggingface_hub

    import finetune.loading
    from finetune.cli import main

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda ref, **k: fetched.append(ref) or str(setup["float"]))

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before --max-new-tokens was checked")

    monkeypatch.setattr(finetune.loading, "load_model", no_load)
    assert main(["chat", "-m", "org/base", "--query", "hi", "--max-new-tokens", "100000000"]) == 2
    assert fetched and set(fetched) == {"org/base"}
    assert capsys.readouterr().err == (f"error: --max-new-tokens 100000000 is more than {setup['float']} holds (at "
                                       "most 1024: max(max_position_embeddings, 4 x seq_length) of its config.json)\n")


def test_a_set_seed_samples_each_reply_the_same_way(setup):
    """As the official demo: the seed is set again before every reply, so a question asked afresh (history
    cleared) gets the same sampled reply; without a seed it differs (the untrained model's flat distribution)."""
    from finetune import load_model, load_tokenizer
    from finetune.chat import PROMPT

    model, tok = load_model(setup["float"]), load_tokenizer(setup["float"])
    flags = ["--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--max_new_tokens", "12"]
    seeded = _session(model, tok, [":seed 4", "hi", ":clear", "hi"], flags).split(PROMPT)
    assert seeded[2] == seeded[4] and len(seeded[2].strip()) > len("Qwen>")
    free = _session(model, tok, ["hi", ":clear", "hi"], flags).split(PROMPT)
    assert free[1] != free[3]


def test_interactive_chat_warms_the_decoder_up_first_on_a_gpu(setup, monkeypatch):
    """On CUDA the chat engine's first-use work runs before the first question (said in one line); the replies
    are those of a chat without it (here the CUDA check is patched: the engine warms up on the CPU)."""
    import finetune.chat as chat_cli
    from finetune import load_model, load_tokenizer
    from finetune.chat import ANSWER, PROMPT
    from finetune.settings import override

    from finetune.inference import Engine

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    monkeypatch.setattr(chat_cli, "_on_cuda", lambda m: True)
    expected = []
    warm_up = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", lambda self, expect: expected.append(expect) or warm_up(self, expect))
    text = _session(model, tok, [MEMORISE[1][0], ":q"], ["--greedy", "--max_new_tokens", "24"])
    first = text.split(PROMPT)[0]
    assert first.startswith("(decoder warmed up in ") and "Chat with the model." in first
    assert text.split(PROMPT)[1].strip() == ANSWER + MEMORISE[1][1]
    # the decode steps warmed up are those of the replies' settings: greedy here, as the flags ask
    assert [[p.do_sample for p in expect] for expect in expected] == [[False]]
    _session(model, tok, [":q"], ["--temperature", "0.7"])
    assert [p.do_sample for p in expected[-1]] == [True] and expected[-1][0].temperature == 0.7
    monkeypatch.setattr(chat_cli, "_on_cuda", lambda m: False)
    assert "warmed up" not in _session(model, tok, [":q"])
    monkeypatch.setattr(chat_cli, "_on_cuda", lambda m: True)
    with override(static_decode=False):  # replies through generate(): no engine to warm
        assert "warmed up" not in _session(model, tok, [":q"])


def test_a_stream_closed_early_stops_its_generation(setup):
    """Ctrl-C in the chat (or any consumer closing the stream) ends generate() too: it used to run on to
    max_new_tokens in its thread, beside the next reply. min_new_tokens keeps the tiny model from stopping early."""
    import threading

    from finetune import load_model, load_tokenizer

    model, tok = load_model(setup["float"]), load_tokenizer(setup["float"])
    before = set(threading.enumerate())
    stream = model.chat_stream(tok, "hi", history=None, do_sample=False, max_new_tokens=3000, min_new_tokens=3000)
    next(stream)
    started = [t for t in threading.enumerate() if t not in before]
    assert started  # generate() runs in its own thread
    stream.close()
    assert not any(t.is_alive() for t in started)  # joined on close, and it ended: no wait needed


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_history(setup, monkeypatch):
    """A KeyboardInterrupt while the reply streams: '(interrupted)', the turn is not kept, the generation behind
    it has stopped, and the next question is answered as in a fresh chat."""
    import io
    import threading

    import finetune.chat as chat_cli
    from finetune import load_model, load_tokenizer
    from finetune.chat import ANSWER, PROMPT, _parser, interactive

    settings = chat_cli.generation_kwargs
    calls = []  # the first (interrupted) reply would run 3000 tokens: still running when the session goes on

    def first_reply_long(conf):
        calls.append(1)
        return dict(settings(conf), **({"max_new_tokens": 3000, "min_new_tokens": 3000} if len(calls) == 1 else {}))

    monkeypatch.setattr(chat_cli, "generation_kwargs", first_reply_long)

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    before = set(threading.enumerate())

    class Out(io.StringIO):
        interrupt = True

        def write(self, text):  # Ctrl-C as the first piece of the first reply is printed
            if self.interrupt and self.getvalue().endswith(ANSWER) and text:
                self.interrupt = False
                raise KeyboardInterrupt
            return super().write(text)

    out = Out()
    args = _parser().parse_args(["-m", "unused", "--greedy", "--max_new_tokens", "24"])
    lines = ["hi", ":history", MEMORISE[2][0], ":history", ":q"]
    assert interactive(model, tok, args, stdin=io.StringIO("".join(s + "\n" for s in lines)), out=out) == 0
    replies = out.getvalue().split(PROMPT)
    assert "(interrupted)" in replies[1] and replies[2].strip() == "(no history)"
    assert replies[3].strip() == ANSWER + MEMORISE[2][1]
    assert replies[4].strip() == f"User[0]: {MEMORISE[2][0]}\nQwen[0]: {MEMORISE[2][1]}"
    assert not any(t.is_alive() for t in threading.enumerate() if t not in before)


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "a1", "--adapter", "a2"], "-a/--adapter given twice ('a1' and 'a2'); pass it once"),
    (["-a", "a1", "--adapter", "a1"], "-a/--adapter given twice"),
    (["-m", "other"], "-m/--model given twice"),
    (["-s", "one", "--system", "two"], "--system/-s given twice ('one' and 'two')"),
    (["--seed", "1", "--seed", "2"], "--seed given twice (1 and 2); pass it once"),  # the sampling flags too
    (["--temperature", "0.5", "--temperature", "0.9"], "--temperature given twice (0.5 and 0.9)"),
    (["--top-p", "0.5", "--top_p", "0.9"], "--top_p/--top-p given twice"),
    (["--greedy", "--temperature", "0.7"], "--greedy does not sample, so --temperature 0.7 would be ignored"),
    (["--greedy", "--top-p", "0.5", "--top-k", "3"], "so --top-p 0.5, --top-k 3 would be ignored"),
    (["--greedy", "--seed", "3"], "--greedy does not sample, so --seed 3 would be ignored"),  # (it seeded nothing)
    # a temperature below 0.01 is greedy decoding itself: a seed or top-p beside it was accepted and did nothing
    (["--temperature", "0", "--seed", "1"],
     "--temperature 0 decodes greedily (below 0.01, as --greedy), so --seed 1 would be ignored; pass one or the other"),
    (["--temperature", "0.001", "--top-p", "0.5"], "--temperature 0.001 decodes greedily (below 0.01, as --greedy), so "
                                                   "--top-p 0.5 would be ignored"),
    (["--query", "  "], "--query is empty"),
])
def test_contradicting_or_repeated_flags_are_one_line_before_loading(tmp_path, capsys, monkeypatch, flags, message):
    """argparse keeps the last of a repeated flag silently (the first adapter was dropped) and --greedy silently
    overrode the sampling flags: each is now an error, before the model loads."""
    import finetune.chat
    from finetune.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(finetune.chat, "load", no_load)
    query = [] if "--query" in flags else ["--query", "hi"]
    assert main(["chat", "-m", str(tmp_path), *query, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_every_chat_flag_has_help():
    # the sampling flags and --device had none: --help said neither their range nor where their default comes from
    from finetune.chat import _parser

    helps = {a.option_strings[-1]: a.help for a in _parser()._actions}
    assert [flag for flag, text in helps.items() if not text] == []
    assert "below 0.01: greedy" in helps["--temperature"] and "generation config" in helps["--top-p"]


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device: device 'cuda': "),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--dtype", "int3"], "--dtype: unknown dtype 'int3'"),
])
def test_a_device_or_dtype_not_here_is_one_line_before_anything_is_read(tmp_path, capsys, monkeypatch, flags,
                                                                        message):
    # load_model refused them, but after a hub id had been fetched and the tokenizer read: now at once, as serve
    import torch

    import finetune.chat
    from finetune.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(finetune.chat, "load", no_load)
    assert main(["chat", "-m", str(tmp_path), "--query", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--adapter", ""], "-a/--adapter is empty"),  # (an unset $ADAPTER) chatted with the base model alone
    (["--adapter", " "], "-a/--adapter is empty"),
    (["-m", "", "--adapter", "lora"], "-m/--model is empty"),  # was the current dir: ". has no config.json"
    (["-m", ""], "-m/--model is empty"),  # was "pass -m MODEL"
])
def test_an_empty_model_or_adapter_is_one_line_before_loading(tmp_path, capsys, monkeypatch, flags, message):
    import finetune.chat
    from finetune.cli import main

    def no_load(args):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(finetune.chat, "load", no_load)
    argv = flags if "-m" in flags else ["-m", str(tmp_path), *flags]
    assert main(["chat", *argv, "--query", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "abc"], "argument --top_p/--top-p: invalid float value: 'abc'"),
    (["--max-new-tokens", "1.5"], "argument --max_new_tokens/--max-new-tokens: invalid int value: '1.5'"),
    (["--bogus"], "unknown flag --bogus"),
    (["--query"], "argument --query/-q: expected one argument"),
    # a prefix was taken for the flag it abbreviates (--adapt, --temp), silently, until another flag began the same
    (["--adapt", "x"], "unknown flag --adapt (did you mean -a/--adapter? flags are not abbreviated)"),
    (["--temp", "0"], "unknown flag --temp (did you mean --temperature? flags are not abbreviated)"),
    # another tool's name for a flag, another command's flag, a short flag chat does not have
    (["--model-dir", "x"], "unknown flag --model-dir (did you mean -m/--model?)"),
    (["--adapter_dir", "x"], "unknown flag --adapter_dir (did you mean -a/--adapter?)"),
    (["--num_train_epochs", "3"], "unknown flag --num_train_epochs (a flag of qwen-ft train, not of qwen-ft chat)"),
    (["-o", "x"], "unknown flag -o (a flag of qwen-ft train, merge, eval, not of qwen-ft chat)"),
    (["Who are you?"], "'Who are you?' without a flag (a question goes with -q/--query, quoted)"),
    # a path that is not there is no question (it was told to go with -q)
    (["/models/missing"], "'/models/missing' without a flag (no such file or dir; a model dir goes with -m/--model)"),
])
def test_a_value_argparse_refuses_is_one_line(tmp_path, capsys, flags, message):
    # (argparse printed its usage, eight lines, above the error, where eval and merge print one line)
    from finetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat", "-m", str(tmp_path), *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {message} (see qwen-ft chat --help)\n"


def test_a_model_or_adapter_dir_given_without_its_flag_is_named_with_the_flag(setup, capsys):
    """`qwen-ft chat /models/x` was "unrecognized arguments: /models/x"; the dir's kind says which flag it needs, in
    every command that takes it (serve's adapter as NAME=DIR)."""
    from finetune.cli import main

    model, adapter = str(setup["float"]), str(setup["lora"])
    data = str(setup["lora"].parent / "mem.json")
    for argv, says in ((["chat", model], f"a model dir goes with -m/--model: -m {model}"),
                       (["chat", adapter], f"an adapter dir goes with -a/--adapter: -a {adapter}"),
                       (["merge", adapter, "-o", "x"], f"an adapter dir goes with -a/--adapter: -a {adapter}"),
                       (["eval", "-a", adapter, data], f"chat data goes with -d/--data: -d {data}"),
                       (["serve", model], f"a model dir goes with -m/--model: -m {model}"),
                       (["serve", "-m", model, adapter], f"goes with -a/--adapter: -a NAME={adapter}")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, (argv, err)


@pytest.mark.parametrize("command, flags, value", [
    ("chat", ["--max_new_tokens", "3"], ("max_new_tokens", 3)), ("chat", ["--max-new-tokens=3"], ("max_new_tokens", 3)),
    ("eval", ["-d", "x.json", "--max_new_tokens", "3"], ("max_new_tokens", 3)),
    ("eval", ["-d", "x.json", "--batch_size=2", "--no_generate", "-o", "r.json"], ("batch_size", 2)),
    ("merge", ["-a", "x", "-o", "y", "--max_shard_size", "1GB"], ("max_shard_size", "1GB")),
    ("serve", ["-m", "x", "--max_batch", "4", "-a", "n=d"], ("max_batch", 4)),
    ("demo", ["--make_model", "d"], ("make_model", "d")),
    # (a value that looks like a flag is a value: --system=--x_y)
    ("chat", ["--system=--top_k"], ("system", "--top_k")),
])
def test_a_long_flag_takes_either_spelling_in_every_command(command, flags, value):
    """The trainer's flags are spelled with _, the other commands' with - (chat had some of both): --max_new_tokens
    in eval or --max_batch in serve was "unrecognized arguments". Now either spelling, in every command."""
    import importlib

    from finetune.command_line import PARSERS

    module, builder = PARSERS[command]
    args = getattr(importlib.import_module(module), builder)().parse_args(flags)
    assert getattr(args, value[0]) == value[1]


def test_greedy_with_a_greedy_temperature_is_no_contradiction(setup):
    r = subprocess.run([sys.executable, "-m", "finetune.cli", "chat", "-a", str(setup["lora"]), "--query",
                        MEMORISE[1][0], "--greedy", "--temperature", "0"],
                       capture_output=True, text=True, env=subprocess_env(TERM="dumb"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == MEMORISE[1][1]


def test_undecodable_input_and_unencodable_replies_do_not_end_the_chat(setup):
    """Non-UTF-8 bytes on a strict UTF-8 stdin (a Latin-1 paste) used to end the session with input()'s
    UnicodeDecodeError; an ASCII stdout, with print()'s UnicodeEncodeError after the reply. Now U+FFFD / '?'."""
    base = [sys.executable, "-m", "finetune.cli", "chat", "-m", str(setup["float"]), "--greedy",
            "--max_new_tokens", "4"]
    r = subprocess.run(base, input=b"caf\xe9 \xff ok\n:history\n", capture_output=True, timeout=120,
                       env=subprocess_env(TERM="dumb", PYTHONIOENCODING="utf-8"))
    out = r.stdout.decode("utf-8")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert "User[0]: caf\ufffd \ufffd ok" in out
    r = subprocess.run(base + ["--query", "\u4f60\u597d \U0001f600"], capture_output=True, timeout=120,
                       env=subprocess_env(TERM="dumb", PYTHONIOENCODING="ascii"))
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    r = subprocess.run(base, input="\u4f60\u597d\n:history\n".encode(), capture_output=True, timeout=120,
                       env=subprocess_env(TERM="dumb", PYTHONIOENCODING="ascii"))
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert b"User[0]: ??????" in r.stdout  # each undecodable byte one U+FFFD, printed as '?'


def test_a_message_past_the_window_is_one_line_and_the_chat_goes_on(setup, capsys):
    """make_context never cuts the query: a message longer than the window (a pasted file) went to the model
    whole, past the length it is made for. Now it is refused in one line; the session and history go on."""
    from finetune import load_model, load_tokenizer
    from finetune.chat import ANSWER, PROMPT
    from finetune.cli import main

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    flags = ["--greedy", "--max_new_tokens", "24", "--history-window", "200"]
    text = _session(model, tok, ["word " * 400, MEMORISE[0][0], ":history"], flags).split(PROMPT)
    assert text[1].strip().startswith("(the message is ") and "more than the 200-token window" in text[1]
    assert text[1].strip().endswith("not sent)") and ANSWER not in text[1]
    assert text[2].strip() == ANSWER + MEMORISE[0][1]
    assert text[3].strip() == f"User[0]: {MEMORISE[0][0]}\nQwen[0]: {MEMORISE[0][1]}"  # nothing of the long one
    assert main(["chat", "-a", str(setup["lora"]), "--query", "word " * 400, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the message is ") and err[-1].endswith("200-token window (--history-window)")


def test_the_history_kept_is_exactly_what_make_context_would_include(setup):
    """The turns the chat keeps (and :history shows) are the ones model.chat would put in the prompt from the whole
    conversation, at every window size: the kept turns' estimate (+12 tokens a turn) dropped turns at the edge."""
    from finetune import load_tokenizer
    from finetune.chat import trim_history
    from finetune.modeling import make_context

    tok = load_tokenizer(setup["float"])
    system = "You are a helpful assistant."
    history = [(q, a) for q, a in MEMORISE] + [("\U0001f600 <|im_start|>user", "<|im_end|> \u4f60\u597d")]
    for window in range(20, 400, 3):
        kept = trim_history(tok, history, system, window)
        assert kept == history[len(history) - len(kept):]
        assert make_context(tok, "next", kept, system, 10 ** 9)[1] == make_context(tok, "next", history, system,
                                                                                   window)[1], window


def test_streamed_pieces_add_up_to_the_final_text_at_multibyte_boundaries(setup):
    """The tiny vocabulary splits CJK, emoji and accents into byte tokens: the pieces the chat prints as they grow
    (one token at a time) must add up to the final text, with no reprint and no U+FFFD from a split character."""
    import random

    from finetune import load_tokenizer
    from finetune.modeling.chat import _stream_text

    tok = load_tokenizer(setup["float"])
    stops = {tok.im_end_id, tok.im_start_id}
    ordinary = list(range(tok.eod_id + 1)) + list(range(tok.im_end_id + 1, len(tok)))  # every id but the stops
    rng = random.Random(0)
    text = " \u4f60\u597d, \U0001f600 h\u00e9llo \U0001f469\u200d\U0001f467 \u00fcn\u00efc\u00f6d\u00e9 \n end "
    cases = [tok.encode(text)] + [[rng.choice(ordinary) for _ in range(rng.randint(1, 30))] for _ in range(500)]
    assert max(len(tok.decode([i]).encode()) for i in cases[0]) < len(text.encode())  # split into pieces
    for ids in cases:
        printed = shown = ""
        for grown in _stream_text(tok, ([i] for i in ids), stops):
            assert grown.startswith(printed), (ids, printed, grown)
            shown += grown[len(printed):]
            printed = grown
        assert shown == printed == tok.decode(ids, skip_special_tokens=True, errors="ignore"), ids
    assert printed and "\ufffd" not in tok.decode(cases[0])


def test_the_second_turn_equals_model_chat_stream_with_the_first_as_history(setup):
    """Two greedy turns in the interactive chat answer as model.chat_stream(tokenizer, query, history=...) does,
    each reply kept as history as streamed (the official cli_demo's loop)."""
    from finetune import load_model, load_tokenizer
    from finetune.chat import ANSWER, PROMPT

    model, tok = load_model(None, adapter=setup["lora"]), load_tokenizer(setup["float"])
    questions = [MEMORISE[0][0], "And what about the other one?"]
    text = _session(model, tok, questions, ["--greedy", "--max_new_tokens", "24", "-s", "Be brief."])
    replies = [r.strip()[len(ANSWER):] for r in text.split(PROMPT)[1:3]]
    expected, history = [], None
    for q in questions:
        reply = list(model.chat_stream(tok, q, history=history, system="Be brief.", do_sample=False,
                                       max_new_tokens=24))[-1]
        history = (history or []) + [(q, reply)]
        expected.append(reply)
    assert replies == [r.strip() for r in expected]  # (the session's lines, as printed, are stripped here)


def test_control_characters_in_a_reply_are_shown_not_obeyed_on_a_terminal():
    """A reply's ESC sequence (or a tiny model's stray \\x13) went to the terminal raw, where it clears the screen,
    moves the cursor or retitles the window: on a terminal it is shown as \\xNN; piped, the text is as generated."""
    import io

    from finetune.chat import stream_reply

    class Model:
        def chat_stream(self, tokenizer, query, history, system, **kw):
            yield "a\x1b[2J"
            yield "a\x1b[2Jb\tc\nd\x9b\x7f\x13\u4f60"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for out, shown in [(Terminal(), "a\\x1b[2Jb\tc\nd\\x9b\\x7f\\x13\u4f60\n"),
                       (io.StringIO(), "a\x1b[2Jb\tc\nd\x9b\x7f\x13\u4f60\n")]:
        assert stream_reply(Model(), None, "q", [], "s", out) == "a\x1b[2Jb\tc\nd\x9b\x7f\x13\u4f60"  # history: as is
        assert out.getvalue() == shown


def test_a_stream_closed_early_closes_the_fast_decoders_tokens(setup):
    """The same through the registered fast decoder (the CUDA engine): its token generator, whose finally frees
    the engine's row, is closed with the stream, not when the last reference to the stream's frame goes."""
    import gc

    from finetune import load_model, load_tokenizer
    from finetune.modeling import chat as chat_module

    model, tok = load_model(setup["float"]), load_tokenizer(setup["float"])
    closed = []

    def tokens():
        try:
            while True:
                yield 300
        finally:
            closed.append(True)

    previous = chat_module._fast_decoder
    chat_module.register_decoder(lambda model, tokenizer, input_ids, gc: tokens())
    gc.disable()  # only an explicit close counts
    try:
        stream = model.chat_stream(tok, "hi", history=None, do_sample=False)
        next(stream)
        frame = stream.gi_frame  # noqa: F841  (a reference to its frame, as a live traceback holds one)
        stream.close()
        assert closed == [True]
    finally:
        gc.enable()
        chat_module.register_decoder(previous)


@pytest.mark.parametrize("mode", ["query", "interactive"])
def test_a_reader_that_leaves_stdout_ends_chat_quietly(tiny_model_dir, mode):
    """`qwen-ft chat -q ... | head -1`: a reader that closes the pipe early made the reply's write a BrokenPipeError
    traceback (one-shot and interactive alike). Now chat stops without a word, with the status a process that
    SIGPIPE ends has (141), as `cat` has in such a pipe."""
    argv = [sys.executable, "-m", "finetune.cli", "chat", "-m", str(tiny_model_dir), "--max_new_tokens", "8"]
    argv += ["--query", "hello"] if mode == "query" else []
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env(TERM="dumb"))
    proc.stdout.close()  # (before anything is written: every write of chat's finds no reader)
    _, err = proc.communicate(b"hello\nagain\n", timeout=120)
    assert proc.returncode == 141 and err.decode() == "", err.decode()[-2000:]
