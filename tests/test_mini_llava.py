"""The miniature LLaVA benchmark: determinism, no leakage, real files in LLaVA format."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icons.data.mini_llava import TASK_NAMES, BenchmarkSpec, build
from icons.data.mini_llava.families import FAMILY_SHARES

SMOKE = BenchmarkSpec(pool_size=400, n_val=8, n_test=20)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build(SMOKE, tmp_path_factory.mktemp("bench"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(bench, tmp_path):
    again = build(SMOKE, tmp_path)
    assert _tree_digest(again.root) == _tree_digest(bench.root)


def test_different_seed_differs(bench, tmp_path):
    other = build(BenchmarkSpec(pool_size=400, n_val=8, n_test=20, seed=1), tmp_path)
    assert (other.root / "pool.json").read_bytes() != (bench.root / "pool.json").read_bytes()


def test_llava_format(bench):
    pool = json.loads(bench.pool_path.read_text())
    assert len(pool) == SMOKE.pool_size
    assert len({r["id"] for r in pool}) == len(pool)
    text_only = 0
    for r in pool:
        assert set(r) <= {"id", "image", "conversations"}, "metadata must stay out of the pool file"
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        if "image" in r:
            assert conv[0]["value"].startswith("<image>\n")
            with Image.open(bench.image_root / r["image"]) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
        else:
            text_only += 1
            assert all("<image>" not in t["value"] for t in conv)
    assert text_only > 0


def test_side_metadata(bench):
    meta = [json.loads(line) for line in bench.meta_path.read_text().splitlines()]
    pool = json.loads(bench.pool_path.read_text())
    assert [m["id"] for m in meta] == [r["id"] for r in pool]
    fams = Counter(m["family"] for m in meta)
    assert set(fams) == set(FAMILY_SHARES)
    dups = [m for m in meta if "dup_of" in m]
    assert len(dups) == round(SMOKE.pool_size * SMOKE.p_duplicate)
    by_id = {r["id"]: r for r in pool}
    for m in dups:  # a duplicate is an exact copy of its original
        a, b = by_id[m["id"]], by_id[m["dup_of"]]
        assert a["conversations"] == b["conversations"] and a.get("image") == b.get("image")
    assert any(m.get("noise") == "label" for m in meta)


def test_no_val_or_test_item_in_pool(bench):
    pool = json.loads(bench.pool_path.read_text())
    pool_images = {r["image"] for r in pool if "image" in r}
    pool_pixels = {hashlib.sha1(np.asarray(Image.open(bench.image_root / p)).tobytes()).hexdigest() for p in pool_images}
    seen_eval = set()
    for task in TASK_NAMES:
        for split in ("val", "test"):
            recs = json.loads(bench.task_path(task, split).read_text())
            assert recs, (task, split)
            for r in recs:
                assert r["image"] not in pool_images, (task, split, r["id"])
                px = hashlib.sha1(np.asarray(Image.open(bench.image_root / r["image"])).tobytes()).hexdigest()
                assert px not in pool_pixels, (task, split, r["id"])
                if task != "mme":  # MME asks two questions of one image
                    assert r["image"] not in seen_eval
                seen_eval.add(r["image"])


def test_task_sizes_and_metric_fields(bench):
    for task in TASK_NAMES:
        test = json.loads(bench.task_path(task, "test").read_text())
        assert len(test) == SMOKE.n_test * (2 if task == "mme" else 1)
        for r in test:
            assert r["conversations"][-1]["value"] == r["answer"]
            if task in ("mmbench_en", "mmbench_cn", "sqa"):
                assert r["options"][r["answer_index"]] and r["answer"] in "ABCD"
    mme = json.loads(bench.task_path("mme", "val").read_text())
    assert {r["subtask"] for r in mme} == {"existence", "count", "position", "color", "ocr"}
    pope = json.loads(bench.task_path("pope", "test").read_text())
    assert Counter(r["answer"] for r in pope) == {"yes": 10, "no": 10}


def _verify_truth(spec: dict, question: str) -> str:
    """Re-derive a verify question's answer from the spec by parsing the question (independent of
    the generator's own bookkeeping)."""
    import re

    if spec["kind"] == "sign":
        if m := re.fullmatch(r"Is the number ([\d ]+) written on the sign \?", question):
            return "yes" if m.group(1).replace(" ", "") == "".join(map(str, spec["digits"])) else "no"
        m = re.fullmatch(r"Is the sign (\w+) \?", question)
        return "yes" if m.group(1) == spec["bg"] else "no"
    objs = spec["objs"]
    if m := re.fullmatch(r"Are there (\d) objects in the image \?", question):
        return "yes" if int(m.group(1)) == len(objs) else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+) at the (\w+ \w+) \?", question):
        o = next(o for o in objs if (o["color"], o["shape"]) == m.group(1, 2))
        return "yes" if o["cell"] == m.group(3) else "no"
    if m := re.fullmatch(r"Is the object at the (\w+ \w+) (\w+) \?", question):
        return "yes" if next(o for o in objs if o["cell"] == m.group(1))["color"] == m.group(2) else "no"
    m = re.fullmatch(r"Is the (\w+) (\w+) \?", question)
    return "yes" if next(o for o in objs if o["shape"] == m.group(1))["color"] == m.group(2) else "no"


def test_verify_questions_are_true_or_false_as_labelled():
    import random

    from icons.data.mini_llava.language import q_verify
    from icons.data.mini_llava.scenes import sample_scene, sample_sign

    rng = random.Random(0)
    answers, skills = Counter(), Counter()
    for i in range(600):
        spec = sample_scene(rng) if i % 3 else sample_sign(rng, "train")
        qa = q_verify(spec, rng)
        assert qa.answer == _verify_truth(spec, qa.question), (spec, qa)
        answers[qa.answer] += 1
        skills[qa.skill] += 1
    assert set(skills) == {"verify_number", "verify_sign_color", "verify_count", "verify_position", "verify_color"}
    assert abs(answers["yes"] - answers["no"]) < 80  # balanced up to sampling noise (600 draws)


def _spec_from_caption(text: str) -> dict:
    """Rebuild the facts a caption states (objects with colour, shape and cell; or a sign)."""
    import re

    if m := re.fullmatch(r"A (\w+) sign with the number ([\d ]+) in (\w+) \.", text):
        return {"kind": "sign", "bg": m.group(1), "digits": [int(d) for d in m.group(2).split()]}
    objs = [{"color": c, "shape": s, "cell": cell}
            for c, s, cell in re.findall(r"A \w+ (\w+) (\w+) at the (\w+ \w+) \.", text)]
    return {"kind": "scene", "objs": objs}


def test_stream_v8_verify_answers_agree_with_the_context():
    """Stage-1 stream v8's verify items ask about the scene or sign described in their context;
    their yes/no must be what the caption states (the caption parsed back, not the generator's spec)."""
    import random

    from icons.data.mini_llava.pretraining import TEXT_MIXES, text_example

    assert "verify" in TEXT_MIXES[8] and "verify" not in TEXT_MIXES[7]
    rng, seen = random.Random(3), Counter()
    while sum(seen.values()) < 150:
        conv = text_example(rng, 8)
        q = conv[0]["value"]
        if not q.startswith("Context : ") or len(conv) != 2 or conv[1]["value"] not in ("yes", "no"):
            continue
        context, question = q[len("Context : "):].split(" Question : ")
        try:
            truth = _verify_truth(_spec_from_caption(context), question)
        except (AttributeError, StopIteration):
            continue  # a yes/no question of another skill (existence, relation)
        assert conv[1]["value"] == truth, q
        seen[truth] += 1
    assert seen["yes"] > 40 and seen["no"] > 40


# science facts written out here, not imported: the tests check the generator against them
SIDES = {"circle": "0", "triangle": "3", "square": "4", "cross": "12"}
CORNERS = {"circle": "no", "triangle": "yes", "square": "yes", "cross": "yes"}


def test_science_multiple_choice_letter_names_the_true_fact():
    """The pool's ScienceQA-style records: the fact as context, options lettered A-C; the letter
    answered must name what the pictured object really is (sides, corners, warm/cool)."""
    import random
    import re

    from icons.data.mini_llava.families import make_record
    from icons.data.mini_llava.language import SCIENCE_FACTS

    rng, n_mc = random.Random(5), 0
    for _ in range(300):
        rec = make_record("science", rng)
        q, letter = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        if "Answer with the option's letter" not in q:
            continue
        n_mc += 1
        assert any(fact in q for fact in SCIENCE_FACTS.values())
        opts = dict(re.findall(r"\b([ABC]) \. (\w+)", q))
        ref = re.search(r"(?:Does|does|of) the (object at the \w+ \w+|\w+)", q).group(1)
        objs = rec["_spec"]["objs"]
        o = next(o for o in objs if (ref == f"object at the {o['cell']}" or ref == o["shape"]))
        if "sides" in q:
            want = SIDES[o["shape"]]
        elif "corners" in q:
            want = CORNERS[o["shape"]]
        else:
            want = "warm" if o["color"] in ("red", "yellow") else "cool"
        assert opts[letter] == want, q
    assert n_mc > 100


def _scene_truth(q: str, spec: dict) -> str:
    """The true answer of a pool multiple-choice stem, read off the scene spec (colour, shape,
    count or place of the object the stem names)."""
    import re

    objs = spec["objs"]
    if q.startswith("How many objects are there ?"):
        return str(len(objs))
    if m := re.match(r"What color is the (object at the (\w+ \w+)|\w+) \?", q):
        return next(o["color"] for o in objs if o["cell"] == m.group(2) or o["shape"] == m.group(1))
    if m := re.match(r"What shape is (?:the (\w+) object|at the (\w+ \w+)) \?", q):
        return next(o["shape"] for o in objs if o["color"] == m.group(1) or o["cell"] == m.group(2))
    m = re.match(r"Where is the (\w+) (\w+) \?", q)
    return next(o["cell"] for o in objs if (o["color"], o["shape"]) == m.groups())


def test_multiple_choice_family_has_four_options_like_a_okvqa():
    """The pool's A-OKVQA analog: always four lettered options (A-OKVQA's and MMBench's make-up),
    so the answer letter is uniform over A-D rather than favouring A (2-4 options made A the
    answer 36% of the time, D 8%); the letter names what the scene shows."""
    import random
    import re

    from icons.data.mini_llava.families import MC_SUFFIX, make_record

    rng, letters = random.Random(11), Counter()
    for _ in range(800):
        rec = make_record("mc", rng)
        q, letter = rec["conversations"][0]["value"].removeprefix("<image>\n"), rec["conversations"][1]["value"]
        assert q.endswith(MC_SUFFIX)
        stem, body = re.match(r"(.*\?) (A \. .*)" + re.escape(MC_SUFFIX), q).groups()
        opts = re.split(r"(?:^| )[ABCD] \. ", body)[1:]
        assert len(opts) == 4 == len(set(opts)), q
        assert opts["ABCD".index(letter)] == _scene_truth(stem, rec["_spec"]), q
        letters[letter] += 1
    assert all(abs(letters[x] / 800 - 0.25) < 0.05 for x in "ABCD"), letters


def _mc_options(prompt: str) -> list[str]:
    """The options of a stream-v9 multiple-choice prompt, parsed back from whichever format it uses."""
    import re

    if "Candidates : " in prompt:
        body = prompt.split("Candidates : ")[1].removesuffix(" . Give the letter .")
        return [part.split(" = ", 1)[1] for part in body.split(" ; ")]
    if "( A ) " in prompt:
        body = prompt[prompt.index("( A ) "):].removesuffix(" Which option is right ?")
        return [part.strip() for part in re.split(r"\( [ABCD] \) ", body)[1:]]
    head = "Options : " if "Options : " in prompt else "Choices : "
    body = prompt.split(head)[1].removesuffix(" Answer with the letter .").removesuffix(" Reply with the letter .")
    return [part.strip() for part in re.split(r"(?:^| )[ABCD] \. ", body)[1:]]


def _true_option(q: str) -> tuple[str, str] | None:
    """(kind, true answer) of a stage-1 text multiple-choice prompt, recomputed from the facts,
    science trivia or sign it states; None for a described scene."""
    import re

    if m := re.search(r"Facts : (.*) Question : What (color|shape) is the (\w+)(?: object)? \?", q):
        facts = re.findall(r"(\w+) (\w+) \.", m.group(1))
        return "facts", next(c if m.group(2) == "color" else s for c, s in facts if m.group(3) in (s, c))
    if m := re.search(r"How many sides does the (\w+) have \?", q):
        return "sides", SIDES[m.group(1)]
    if m := re.search(r"Does the (\w+) have corners \?", q):
        return "corners", CORNERS[m.group(1)]
    if m := re.search(r"Is the color (\w+) warm or cool \?", q):
        return "warm", "warm" if m.group(1) in ("red", "yellow") else "cool"
    if m := re.search(r"Context : (A \w+ sign .*?) Question : What (?:number is written on the sign|is the "
                      r"number on the sign) \?", q):
        return "sign", " ".join(map(str, _spec_from_caption(m.group(1))["digits"]))
    return None


def test_text_only_chat_half_asks_about_a_given_passage():
    """The pool's text-only chat (ShareGPT analog): PASSAGE_SHARE of it asks about a given passage
    in PASSAGE_MIX's kinds (stage-1's text forms: no image, no target instruction sentence), the
    rest is arithmetic and trivia; a lettered answer names the true option, recomputed from the
    facts, trivia or sign the prompt states."""
    import random
    import re

    from icons.data.mini_llava.families import MC_SUFFIX, PASSAGE_SHARE, make_record
    from icons.data.mini_llava.pretraining import PASSAGE_MIX
    from icons.data.mini_llava.tasks import MC_CN, MC_EN

    rng, n, passages, lettered, checked = random.Random(7), 2000, 0, 0, Counter()
    for _ in range(n):
        rec = make_record("text_only", rng)
        q, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        assert rec["_spec"] is None and "<image>" not in q
        assert MC_EN.strip() not in q and MC_CN.strip() not in q and MC_SUFFIX.strip() not in q
        if not re.match(r"(Context|Facts|Question) : ", q):
            continue
        passages += 1
        if answer in ("A", "B", "C", "D"):
            lettered += 1
            if truth := _true_option(q):
                checked[truth[0]] += 1
                assert _mc_options(q)["ABCD".index(answer)] == truth[1], q
    assert abs(passages / n - PASSAGE_SHARE) < 0.04
    assert abs(lettered / passages - PASSAGE_MIX["mc"] - PASSAGE_MIX["choice"]) < 0.06
    assert len(checked) == 5 and min(checked.values()) > 10, checked


def test_stream_v9_multiple_choice_letters_name_the_true_answer():
    """Stream v9's generic multiple choice: the letter answered names the true answer, recomputed
    from the facts, the science trivia or the sign described (not from the generator); all four
    formats and all contents occur; no target task's instruction sentence is used (stage-1 stays
    off the target formats)."""
    import random

    from icons.data.mini_llava.families import MC_SUFFIX
    from icons.data.mini_llava.pretraining import TEXT_MIXES, mc_example, text_example
    from icons.data.mini_llava.tasks import MC_CN, MC_EN

    assert "mc" in TEXT_MIXES[9] and "mc" not in TEXT_MIXES[8]
    rng, checked, formats = random.Random(11), Counter(), Counter()
    for _ in range(800):
        q, letter = (t["value"] for t in mc_example(rng))
        assert MC_EN.strip() not in q and MC_CN.strip() not in q and MC_SUFFIX.strip() not in q
        opts = _mc_options(q)
        assert 2 <= len(opts) <= 4 and len(set(opts)) == len(opts), q
        chosen = opts["ABCD".index(letter)]
        formats[next(f for f in ("Candidates", "( A )", "Options", "Choices") if f in q)] += 1
        if truth := _true_option(q):  # None: a described scene, its answers tested with language.ask
            checked[truth[0]] += 1
            assert chosen == truth[1], q
    assert min(checked.values()) > 15 and len(checked) == 5, checked
    assert len(formats) == 4 and min(formats.values()) > 120, formats
    # stream v9 draws it: the "( A )" format is mc_example's alone, a quarter of its items
    rng = random.Random(2)
    share = sum("Which option is right ?" in text_example(rng, 9)[0]["value"] for _ in range(2000)) / 2000
    assert abs(share - TEXT_MIXES[9]["mc"] / 4) < 0.03


def test_family_shares_reshape_the_pool_and_key_the_cache(bench, tmp_path):
    """data.family_shares (pool-composition ablations): only the families given, in their
    proportions, cached apart from the default pool, which keeps its key."""
    from dataclasses import replace

    only = build(replace(SMOKE, family_shares=(("mc", 3.0), ("verify", 1.0))), tmp_path)
    assert only.root != bench.root
    fams = Counter(json.loads(line)["family"] for line in only.meta_path.read_text().splitlines())
    assert set(fams) == {"mc", "verify"} and 2.0 < fams["mc"] / fams["verify"] < 4.5
    # the default pool's key is the one it had before the field existed (caches stay valid)
    from dataclasses import asdict

    from icons.data.mini_llava.build import GENERATOR_VERSION
    from icons.io import config_hash

    before = {k: v for k, v in asdict(SMOKE).items() if k != "family_shares"}
    assert bench.root.name == config_hash({**before, "version": GENERATOR_VERSION})


def test_family_shares_config_errors(compose_cfg):
    from icons.config import ConfigError, validate

    validate(compose_cfg(["data.family_shares={mc:0.6,science:0.4}"]))
    for overrides, message in [
        (["data.family_shares={mcq:1}"], "data.family_shares=mcq is not a family"),
        (["data.family_shares={mc:-1}"], "data.family_shares=mc: -1 must be a number >= 0"),
        (["data.family_shares={mc:0}"], "must give some family a weight > 0"),
        (["data=llava_json", "data.path=pool.json", "+data.family_shares={mc:1}"],
         "applies to data.kind=mini_llava only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_cfg(overrides))


def test_stream_v10_puts_the_described_image_in_front_of_text_questions():
    """Stream v10: about half of the text questions about a described scene or sign come with that
    scene's own image in front (the caption in the context is the image's caption); facts, trivia and
    copying stay text-only."""
    import random
    import re

    from icons.data.mini_llava.language import caption
    from icons.data.mini_llava.pretraining import base_example

    rng, with_image, described_text_only = random.Random(4), 0, 0
    for _ in range(3000):
        rec = base_example(rng, 1.0, 10)
        first = rec["conversations"][0]["value"]
        if rec["_spec"] is None:
            assert not first.startswith("<image>")
            described_text_only += bool(re.match(r"Context : (There|A \w+ sign )", first))
            continue
        assert first.startswith("<image>\nContext : " + caption(rec["_spec"]) + " "), first
        with_image += 1
    assert with_image > 300 and 0.6 < with_image / described_text_only < 1.6


@pytest.mark.parametrize("version", [11, 12])
def test_stream_v11_seen_choice_letters_name_what_the_image_shows(version):
    """Streams v11 and v12's choice about the image alone: no caption in the prompt (the answer is only
    in the image), stage-1's own candidate format (v12: any generic letter format; never a target
    instruction sentence), and the letter names the true answer recomputed from the image spec (count,
    sign number and colour, science tables); about SEEN_CHOICE_SHARE of the stream; never in v10 or
    in a text-only phase."""
    import random
    import re

    from icons.data.mini_llava.families import MC_SUFFIX
    from icons.data.mini_llava.pretraining import SEEN_CHOICE_SHARE, base_example
    from icons.data.mini_llava.tasks import MC_CN, MC_EN

    def seen(rec):
        return rec["_spec"] is not None and rec["conversations"][0]["value"].startswith(
            ("<image>\nQuestion :", "<image>\nContext : A circle", "<image>\nContext : A triangle",
             "<image>\nContext : Red"))

    rng, checked, formats, n_seen, n = random.Random(5), Counter(), Counter(), 0, 4000
    for _ in range(n):
        rec = base_example(rng, 0.5, version)
        if not seen(rec):
            continue
        n_seen += 1
        q, letter = (t["value"] for t in rec["conversations"])
        assert MC_EN.strip() not in q and MC_CN.strip() not in q and MC_SUFFIX.strip() not in q
        assert "There " not in q and " sign with " not in q, q
        formats[next(f for f in ("Candidates", "( A )", "Options", "Choices") if f in q)] += 1
        opts = _mc_options(q)
        assert 2 <= len(opts) <= 4 and len(set(opts)) == len(opts), q
        chosen, spec = opts["ABCD".index(letter)], rec["_spec"]
        if spec["kind"] == "sign":
            if "number" in q and "color" not in q:
                checked["number"] += 1
                assert chosen == " ".join(map(str, spec["digits"])), q
            elif q.startswith("<image>\nQuestion : What color is the sign ?"):
                checked["sign colour"] += 1
                assert chosen == spec["bg"], q
            continue
        objs = spec["objs"]
        if "How many objects are there ?" in q:
            checked["count"] += 1
            assert chosen == str(len(objs)), q
        elif m := re.search(r"(How many sides does|Does|Is the color of) the (object at the )?([\w ]+?) (have|warm)", q):
            o = next(o for o in objs if m.group(3) in (o["shape"], o["cell"]))
            kind = {"How many sides does": "sides", "Does": "corners", "Is the color of": "warm"}[m.group(1)]
            checked[kind] += 1
            want = {"sides": SIDES[o["shape"]], "corners": CORNERS[o["shape"]],
                    "warm": "warm" if o["color"] in ("red", "yellow") else "cool"}[kind]
            assert chosen == want, q
    assert len(checked) == 6 and min(checked.values()) > 10, checked
    assert abs(n_seen / n - SEEN_CHOICE_SHARE[version]) < 0.03, n_seen
    assert list(formats) == ["Candidates"] if version == 11 else min(formats.values()) > 100, formats
    rng = random.Random(5)
    assert not any(seen(base_example(rng, 0.5, 10)) for _ in range(2000))
    assert not any(seen(base_example(rng, 1.0, version)) for _ in range(2000))
