"""Feature spec (TOML) and the tokenizer: ids, buckets, vocabularies from the training split
only, left padding and truncation, save/load."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from training.split import leave_one_out
from userenc.events import Event
from userenc.spec import DAY, OOV_ID, PAD_ID, Feature, FeatureSpec, load_spec
from userenc.tokenize import EventTokenizer, left_pad

ITEM = '[[feature]]\nname = "item"\nkind = "categorical"\nsource = "item_id"\n'


def test_builtin_specs_load():
    ml = load_spec("movielens")
    assert [(f.name, f.kind) for f in ml.features] == [
        ("item", "categorical"),
        ("genres", "multi_categorical"),
        ("rating", "numeric"),
        ("gap", "time"),
        ("hour", "time"),
        ("weekday", "time"),
    ]
    assert ml.item.name == "item" and ml.features[1].item_attribute and ml.features[3].boundaries  # gap gets default buckets
    assert [f.name for f in load_spec("movielens_id_only").features] == ["item"]
    assert [f.name for f in load_spec("movielens_year").features] == ["item", "genres", "year", "rating", "gap", "hour", "weekday"]
    assert [f.name for f in load_spec("movielens_year_date").features][-1] == "period"
    assert load_spec("movielens_year_item128").item.dim == 128
    assert [f.name for f in load_spec("movielens_words").features] == [
        "item", "genres", "year", "title_words", "rating", "gap", "hour", "weekday"]
    amazon = load_spec("amazon")
    assert [f.name for f in amazon.features] == ["item", "rating", "gap", "summary_words", "text_words"]
    assert [f.split for f in amazon.features[3:]] == ["words", "words"]
    assert [f.name for f in load_spec("generic").features] == ["item", "gap", "hour"]
    assert [f.name for f in ml.only(["item", "rating"]).features] == ["item", "rating"]


def test_spec_from_toml_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n' + ITEM + 'dim = 12\ntarget = true\n[[feature]]\nname = "stars"\nkind = "numeric"\nsource = "rating"\nboundaries = [2.5]\n')
    spec = load_spec(path)
    assert spec.name == "mine" and spec.item.dim == 12 and spec.features[1].source == "rating"
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "text,message",
    [
        ('name = "x"\n[[feature]\n', "invalid TOML"),
        (ITEM + "dimm = 4\n", "feature 'item': unknown keys dimm"),
        ('nmae = "x"\n' + ITEM, "spec: unknown keys nmae"),
        (ITEM.replace("categorical", "embedding"), "kind must be one of"),
        ('[[feature]]\nname = "genres"\nkind = "multi_categorical"\n', 'exactly one categorical feature must have source = "item_id"'),
        (ITEM + ITEM.replace('"item"\n', '"item2"\n', 1), "exactly one categorical feature"),
        ('[[feature]]\nname = "item"\nsource = "item_id"\n', "feature 'item': missing kind"),
        (ITEM + 'dim = "big"\n', "feature 'item': a value has the wrong type"),
        (ITEM + '[[feature]]\nname = "r"\nkind = "numeric"\n', "numeric features need bucket boundaries"),
        (ITEM + '[[feature]]\nname = "r"\nkind = "numeric"\nboundaries = [3, 1]\n', "boundaries must be increasing"),
        (ITEM + '[[feature]]\nname = "t"\nkind = "time"\npart = "minute"\n', "time part must be one of"),
        (ITEM + '[[feature]]\nname = "d"\nkind = "time"\npart = "date"\n', "a date part needs boundaries"),
        (ITEM + '[[feature]]\nname = "d"\nkind = "time"\npart = "date"\nboundaries = ["soon"]\n', "is not a date"),
        (ITEM + '[[feature]]\nname = "d"\nkind = "time"\npart = "date"\nboundaries = [2001-01-01, 2000-01-01]\n',
         "boundaries must be increasing"),
        (ITEM + "dim = 0\n", "out of range"),
        (ITEM + ITEM, "feature names must be unique"),
        ('name = "empty"\n', "at least one [[feature]]"),
        (ITEM + '[[feature]]\nname = "y"\nkind = "categorical"\npattern = "("\n', "pattern is not a regular expression"),
        (ITEM + '[[feature]]\nname = "y"\nkind = "categorical"\npattern = "19"\n', "pattern needs a group"),
        (ITEM + '[[feature]]\nname = "y"\nkind = "numeric"\nboundaries = [1]\npattern = "(1)"\n', "a pattern needs a categorical"),
        ('extends = 3\n' + ITEM, "extends must name a spec"),
        ('extends = "bad.toml"\n' + ITEM, "extends loops"),
        ('extends = "movielens"\nfeature = 3\n', "each [[feature]] entry must be a table with a name"),
        ('extends = "movielens"\n[[feature]]\ndim = 4\n', "each [[feature]] entry must be a table with a name"),
        ('extends = "movielens"\n[[feature]]\nname = "gap"\nkind = "numeric"\nboundaries = []\n', "numeric features need bucket boundaries"),
    ],
)
def test_bad_spec_gives_clear_value_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_spec(path)
    assert message in str(err.value)


def test_spec_extends_another_by_feature_name(tmp_path):
    """`extends`: the base's features in order; a table naming one of them changes only the keys
    it gives; a new name is appended. The built-in variants are movielens_year plus one change."""
    year = load_spec("movielens_year").to_dict()["feature"]
    item128 = load_spec("movielens_year_item128")
    assert item128.name == "movielens_year_item128"
    assert item128.to_dict()["feature"] == [f | {"dim": 128} if f["name"] == "item" else f for f in year]
    date = load_spec("movielens_year_date").to_dict()["feature"]
    assert date[:-1] == year and date[-1]["name"] == "period" and len(date[-1]["boundaries"]) == 46

    (tmp_path / "base.toml").write_text('name = "base"\n' + ITEM + '[[feature]]\nname = "stars"\nkind = "numeric"\n'
                                        'source = "rating"\nboundaries = [2.5, 4.5]\ndim = 4\n')
    (tmp_path / "child.toml").write_text('name = "child"\nextends = "base.toml"\n[[feature]]\nname = "stars"\ndim = 6\n'
                                         '[[feature]]\nname = "hour"\nkind = "time"\npart = "hour"\n')
    child = load_spec(tmp_path / "child.toml")
    assert child.name == "child" and [f.name for f in child.features] == ["item", "stars", "hour"]
    assert child.features[1].dim == 6 and child.features[1].boundaries == [2.5, 4.5] and child.features[1].source == "rating"
    assert FeatureSpec.from_dict(child.to_dict()) == child  # a checkpoint saves the resolved spec
    (tmp_path / "orphan.toml").write_text('extends = "no_such_spec"\n' + ITEM)
    with pytest.raises(FileNotFoundError, match="no built-in spec"):
        load_spec(tmp_path / "orphan.toml")


def test_missing_spec_file():
    with pytest.raises(FileNotFoundError, match="no spec file"):
        load_spec("/nonexistent/spec.toml")
    with pytest.raises(FileNotFoundError, match="no built-in spec"):
        load_spec("no_such_builtin")


def _ev(user: str, item: str, ts: int, **fields) -> Event:
    return Event(f"{user}:{item}:{ts}", user, item, ts, fields)


def test_tokenizer_ids_and_buckets(spec):
    # 2026-11-21 was a Saturday; 03:00 UTC.
    t0 = int(datetime(2026, 11, 21, 3, 0, tzinfo=timezone.utc).timestamp())
    gaps = [0, 0, 59, 60, DAY, 400 * DAY]
    history, ts = [], t0
    ratings = [1, 2, 3, 4, 5, None]
    genres = [["a", "b"], ["b"], ["a", "b", "c", "d"], [], "c|a", ["zzz"]]
    for n, (gap, rating, g) in enumerate(zip(gaps, ratings, genres)):
        ts += gap
        fields = {"genres": g} | ({"rating": rating} if rating is not None else {})
        history.append(_ev("u", f"i{n % 3}", ts, **fields))
    train = history[:5]  # "zzz" is only in the last event: it is not in the vocabulary
    tok = EventTokenizer.fit(spec, [train])
    enc = tok.encode(history)
    # item: by count desc then value: i0 (2), i1 (2), i2 (1) -> 2, 3, 4
    assert tok.vocabs["item"].values == ["i0", "i1", "i2"]
    assert enc["item"].tolist() == [2, 3, 4, 2, 3, 4]
    assert tok.vocab_size(spec.item) == 5 and tok.vocabs["item"].id("unseen") == OOV_ID
    # rating buckets [1.5, 2.5, 3.5, 4.5]: 1 -> 2 ... 5 -> 6, missing -> OOV
    assert enc["rating"].tolist() == [2, 3, 4, 5, 6, OOV_ID]
    assert tok.vocab_size(spec.features[2]) == 7
    # genres (max_values 3): a (3), b (3), c (2) -> 2, 3, 4; padded with 0, truncated to 3;
    # no genres -> [OOV]; "c|a" strings split; a value unseen in training -> OOV
    assert enc["genres"].tolist() == [[2, 3, 0], [3, 0, 0], [2, 3, 4], [OOV_ID, 0, 0], [4, 2, 0], [OOV_ID, 0, 0]]
    # time: hour and weekday (Monday = 0) against datetime; the gap of the first event is unknown
    for e, hour, wday in zip(history, enc["hour"], enc["weekday"]):
        dt = datetime.fromtimestamp(e.timestamp, timezone.utc)
        assert (hour, wday) == (2 + dt.hour, 2 + dt.weekday())
    assert enc["weekday"][0] == 2 + 5 and enc["hour"][0] == 2 + 3
    # gap boundaries [1, 60, 600, 3600, 6h, 1d, 3d, 7d, 30d, 90d, 365d]
    assert enc["gap"].tolist() == [OOV_ID, 2, 3, 4, 8, 13]
    assert tok.vocab_size(spec.features[3]) == 14 and tok.vocab_size(spec.features[4]) == 26 and tok.vocab_size(spec.features[5]) == 9
    assert PAD_ID not in enc["item"] and PAD_ID not in enc["hour"]
    # Item attributes: the genres of each item id (its last-seen genres).
    assert tok.item_attributes["genres"].shape == (5, 3)
    assert tok.item_attributes["genres"][tok.vocabs["item"].id("i1")].tolist() == [4, 2, 0]
    assert tok.item_attributes["genres"][PAD_ID].tolist() == [0, 0, 0]


def test_vocab_limits():
    spec = FeatureSpec("s", [Feature("item", "categorical", source="item_id", max_vocab=2), Feature("tag", "categorical", min_count=2)])
    events = [_ev("u", i, n, tag=t) for n, (i, t) in enumerate([("a", "x"), ("a", "y"), ("b", "x"), ("c", "z"), ("c", "x")])]
    tok = EventTokenizer.fit(spec, [events])
    assert tok.vocabs["item"].values == ["a", "c"] and tok.vocabs["tag"].values == ["x"]
    assert tok.encode(events)["item"].tolist() == [2, 2, OOV_ID, 3, 3]
    assert tok.encode(events)["tag"].tolist() == [2, OOV_ID, 2, OOV_ID, 2]


def test_vocab_built_on_training_split_only(spec):
    histories = {
        "u1": [_ev("u1", "i1", 1), _ev("u1", "i2", 2), _ev("u1", "only_valid", 3), _ev("u1", "only_test", 4)],
        "u2": [_ev("u2", "i2", 1), _ev("u2", "i1", 2), _ev("u2", "i1", 3)],
    }
    split = leave_one_out(histories)
    assert [e.item_id for e in split.train["u1"]] == ["i1", "i2"] and split.valid["u1"][1].item_id == "only_valid"
    assert [e.item_id for e in split.test["u1"][0]] == ["i1", "i2", "only_valid"]
    tok = EventTokenizer.fit(spec, split.train.values())
    assert set(tok.vocabs["item"].values) == {"i1", "i2"}
    assert tok.encode(histories["u1"])["item"].tolist()[2:] == [OOV_ID, OOV_ID]


def test_save_load_roundtrip(spec, sample_tokenizer, sample_histories, tmp_path):
    sample_tokenizer.save(tmp_path / "vocab")
    back = EventTokenizer.load(tmp_path / "vocab")
    assert back.spec == sample_tokenizer.spec
    assert {k: v.values for k, v in back.vocabs.items()} == {k: v.values for k, v in sample_tokenizer.vocabs.items()}
    assert back.item_attributes.keys() == sample_tokenizer.item_attributes.keys()
    for name, table in sample_tokenizer.item_attributes.items():
        np.testing.assert_array_equal(back.item_attributes[name], table)
    for h in list(sample_histories.values())[:5]:
        a, b = sample_tokenizer.encode(h), back.encode(h)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(FileNotFoundError, match="spec.json missing"):
        EventTokenizer.load(tmp_path)


def test_left_pad_truncates_on_the_left(spec, sample_tokenizer, sample_histories):
    hs = list(sample_histories.values())[:3]
    enc = [sample_tokenizer.encode(h[:n]) for h, n in zip(hs, (3, 12, 20))]
    ids, mask = left_pad(enc, spec, max_len=10)
    assert ids["item"].shape == (3, 10) and ids["genres"].shape == (3, 10, 3)
    assert mask.tolist()[0] == [False] * 7 + [True] * 3 and mask[1:].all()
    assert (ids["item"][0, :7] == PAD_ID).all() and ids["item"][0, 7:].tolist() == enc[0]["item"].tolist()
    assert ids["item"][2].tolist() == enc[2]["item"][-10:].tolist()  # the latest 10 events kept
    np.testing.assert_array_equal(ids["genres"][1], enc[1]["genres"][-10:])


def test_words_split_reads_free_text_as_lowercased_words():
    from userenc.events import Event
    from userenc.spec import Feature, FeatureSpec
    from userenc.tokenize import EventTokenizer

    spec = FeatureSpec("t", [Feature("item", "categorical", source="item_id"),
                             Feature("words", "multi_categorical", source="summary", split="words", max_values=3)])
    h = [Event("a", "u", "i1", 1, {"summary": "Great strings, GREAT tone!"}), Event("b", "u", "i2", 2, {"summary": "great"})]
    tok = EventTokenizer.fit(spec, [h])
    assert tok.vocabs["words"].values == ["great", "strings", "tone"]
    assert tok.encode(h)["words"].tolist() == [[2, 3, 2], [2, 0, 0]]
    with pytest.raises(ValueError, match="split must be one of"):
        Feature("x", "categorical", split="words")


def test_pattern_takes_a_value_out_of_a_text_field():
    # movielens_year: the release year in a title is an item attribute; a title without one is
    # missing (OOV in the history, nothing in the item table), so is an event without the field.
    spec = load_spec("movielens_year")
    year = next(f for f in spec.features if f.name == "year")
    assert year.item_attribute and year.source == "title"
    h = [_ev("u", "1", 1, title="Heat (1995)", genres=["Action"], rating=4),
         _ev("u", "2", 2, title="City of Lost Children, The (1995) ", genres=[], rating=3),
         _ev("u", "3", 3, title="Brazil (1985)", rating=5),
         _ev("u", "4", 4, title="Untitled (draft)", rating=2),
         _ev("u", "5", 5, rating=2)]
    tok = EventTokenizer.fit(spec, [h])
    assert tok.vocabs["year"].values == ["1995", "1985"]
    assert tok.encode(h)["year"].tolist() == [2, 2, 3, OOV_ID, OOV_ID]
    items = tok.vocabs["item"]
    assert [tok.item_attributes["year"][items.id(i), 0] for i in "12345"] == [2, 2, 3, PAD_ID, PAD_ID]


def test_title_words_are_an_item_attribute_sequels_share():
    # movielens_words: a title's words (kept when seen in >= 2 events) embed each candidate, so a
    # sequel shares the words of its series; a word seen once is the OOV id, as in a history.
    spec = load_spec("movielens_words")
    words = next(f for f in spec.features if f.name == "title_words")
    assert words.item_attribute and words.split == "words" and words.min_count == 2
    h = [_ev("u", "1", 1, title="Star Wars: Episode IV - A New Hope (1977)", genres=["Sci-Fi"], rating=5),
         _ev("u", "2", 2, title="Star Wars: Episode V - The Empire Strikes Back (1980)", genres=["Sci-Fi"], rating=5),
         _ev("u", "3", 3, title="Heat (1995)", genres=["Action"], rating=4)]
    tok = EventTokenizer.fit(spec, [h])
    vocab = tok.vocabs["title_words"]
    assert set(vocab.values) == {"star", "wars", "episode"}
    table = tok.item_attributes["title_words"]
    items = tok.vocabs["item"]
    shared = {vocab.id(w) for w in ("star", "wars", "episode")}
    assert set(table[items.id("1")]) == shared | {OOV_ID} == set(table[items.id("2")]) - {PAD_ID}
    assert table[items.id("3")].tolist()[:3] == [OOV_ID, OOV_ID, PAD_ID]  # "heat", "1995": once


def test_date_part_buckets_events_by_calendar_period(tmp_path):
    # TOML dates are midnight UTC: an event a second before a boundary is in the bucket before
    # it, one at the boundary in the bucket after; the spec saved with a checkpoint (unix
    # seconds) loads to the same buckets.
    path = tmp_path / "dated.toml"
    path.write_text(ITEM + '[[feature]]\nname = "period"\nkind = "time"\npart = "date"\n'
                    "boundaries = [2000-11-01, 2000-12-01, 2001-01-01T12:00:00Z]\n")
    spec = load_spec(path)
    period = spec.features[1]
    nov = int(datetime(2000, 11, 1, tzinfo=timezone.utc).timestamp())
    assert period.boundaries[0] == nov and period.fixed_size == 2 + 4
    noon = int(datetime(2001, 1, 1, 12, tzinfo=timezone.utc).timestamp())
    times = [nov - 1, nov, nov + 29 * DAY, noon - 1, noon, noon + 900 * DAY]
    h = [_ev("u", str(i), t) for i, t in enumerate(times)]
    tok = EventTokenizer.fit(spec, [h])
    assert tok.encode(h)["period"].tolist() == [2, 3, 3, 4, 5, 5]  # the first event has one too: no gap
    again = FeatureSpec.from_dict(spec.to_dict())
    assert again.features[1].boundaries == period.boundaries
    assert EventTokenizer.fit(again, [h]).encode(h)["period"].tolist() == [2, 3, 3, 4, 5, 5]


def test_next_gap_part_reads_the_following_event_or_the_request_time(tmp_path):
    # Each event's next_gap is the gap feature of the event after it; the last event's is the
    # gap to `now` (the request) and unknown without one. The evaluation hands the target's time.
    path = tmp_path / "next.toml"
    path.write_text(ITEM + '[[feature]]\nname = "gap"\nkind = "time"\npart = "gap"\n'
                    '[[feature]]\nname = "next_gap"\nkind = "time"\npart = "next_gap"\n')
    spec = load_spec(path)
    assert spec.features[2].boundaries == spec.features[1].boundaries and spec.features[2].fixed_size == 14
    h = [_ev("u", str(i), t) for i, t in enumerate([1000, 1000, 1030, 8200, 8200 + 40 * DAY])]
    tok = EventTokenizer.fit(spec, [h])
    plain, asked = tok.encode(h), tok.encode(h, now=h[-1].timestamp + 2 * DAY)
    assert plain["next_gap"][:-1].tolist() == plain["gap"][1:].tolist()
    assert plain["next_gap"][-1] == OOV_ID
    assert asked["next_gap"][-1] == tok.encode(h + [_ev("u", "9", h[-1].timestamp + 2 * DAY)])["gap"][-1]
    assert (asked["next_gap"][:-1] == plain["next_gap"][:-1]).all() and (asked["gap"] == plain["gap"]).all()
    assert tok.encode(h[:1], now=999)["next_gap"].tolist() == [2]  # a clock behind the event: gap 0


def test_evaluation_hands_the_target_time_as_the_request_time():
    from training.evaluate import evaluate

    spec = load_spec("movielens_year_date_next")
    h = [Event(f"e{i}", "u", str(i), 978_300_000 + 60 * i, {"rating": 4, "genres": ["Drama"], "title": "Heat (1995)"})
         for i in range(4)]
    tok = EventTokenizer.fit(spec, [h])
    seen = []

    def scorer(histories, encoded):
        seen.extend(int(e["next_gap"][-1]) for e in encoded)
        import torch
        return torch.zeros(len(histories), len(tok.vocabs["item"]))

    evaluate(scorer, tok, {"u": (h[:3], h[3])})
    assert seen == [int(tok.encode(h)["gap"][-1])]  # 60 s, as the gap of the target itself
