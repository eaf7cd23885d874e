"""Demo data for the notebooks: the MovieLens / synthetic choice said plainly, titles, example sessions, helpers."""

from __future__ import annotations

import pandas as pd
import pytest

from sasrec_jax import demo
from sasrec_jax.errors import DataError
from tests.conftest import DATA_DIR, needs_data


@pytest.fixture
def no_movielens(monkeypatch, tmp_path):
    monkeypatch.delenv("SASREC_DATA_DIR", raising=False)
    monkeypatch.setenv("SASREC_CACHE_DIR", str(tmp_path))  # an empty cache


def test_falls_back_to_synthetic_and_says_so(no_movielens):
    said = []
    data = demo.load_demo_data(download=False, synthetic_users=200, synthetic_items=100, log=said.append)
    assert data.name == demo.SYNTHETIC and not data.is_movielens
    assert said == [data.note] and data.note.startswith("SYNTHETIC DATA, not MovieLens")
    assert "download=False" in data.note  # why MovieLens was not used
    assert list(data.events.columns) == ["user_id", "item_id", "timestamp"]
    assert data.source == {"format": "dataframe"}
    item = int(data.items["item_id"].iloc[0])
    assert data.title(item) == f"item {item}" and data.title(-5) == "item -5"
    assert data.items["genres"].str.startswith("category ").all()


def test_synthetic_example_sessions_have_the_documented_shape(no_movielens):
    data = demo.load_demo_data("synthetic", synthetic_users=500, synthetic_items=200, log=lambda _: None)
    s = data.example_sessions()
    assert [len(s[k]) for k in ("viewed", "cart", "focused", "scattered")] == [3, 2, 5, 5]
    genre = data.items.set_index("item_id")["genres"]
    assert genre[s["focused"]].nunique() == 1
    assert genre[s["scattered"]].nunique() == 5 and genre[s["focused"][0]] not in set(genre[s["scattered"]])
    assert set(s["viewed"]) | set(s["cart"]) <= set(s["focused"])


def test_bad_choice_and_unknown_title():
    with pytest.raises(DataError, match="'auto' or 'synthetic'"):
        demo.load_demo_data("ml-1m")
    data = demo.DemoData(
        "x", pd.DataFrame(), pd.DataFrame({"item_id": [1], "title": ["A (1990)"], "genres": ["Drama"]}), "", {}
    )
    assert data.ids(["A (1990)"]) == [1]
    with pytest.raises(DataError, match="Nope"):
        data.ids(["A (1990)", "Nope"])


def test_most_specific_genre_and_gini():
    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4],
            "genres": ["Action|Sci-Fi", "Action", "Action|Comedy", ""],
        }
    )
    assert demo.most_specific_genre(items).to_dict() == {1: "Sci-Fi", 2: "Action", 3: "Comedy", 4: "unknown"}
    assert demo.gini([3, 3, 3]) == 0.0
    assert demo.gini([0, 0, 0, 8]) == pytest.approx(0.75)
    assert demo.gini([]) == 0.0 and demo.gini([0, 0]) == 0.0


@needs_data
def test_movielens_titles_and_sessions():
    data = demo.load_demo_data(download=False, log=lambda _: None)
    assert data.is_movielens and data.source["format"] == "ml-100k" and str(DATA_DIR) in data.source["path"]
    sessions = data.example_sessions()
    assert data.titles(sessions["viewed"]) == demo.ML100K_SESSIONS["viewed"]
    assert sessions["cart"] == [181, 50]  # Return of the Jedi, Star Wars
    assert len(data.events) == 100_000
