"""Demo data for the notebooks: MovieLens-100K with titles and genres, else the synthetic sessions, said plainly.

The notebooks call `load_demo_data()` and then work the same on either: `events` to train on, `items` to print
titles and colour plots by genre, and `example_sessions()` for the use cases (real movies on MovieLens,
stand-ins of the same shape on the synthetic data)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sasrec_jax import logs, movielens, synthetic
from sasrec_jax.errors import DataError

ML100K = "MovieLens-100K"
SYNTHETIC = "synthetic"

# The use cases of the quickstart, as titles exactly as u.item spells them.
ML100K_SESSIONS = {
    "viewed": ["Star Wars (1977)", "Fargo (1996)", "Contact (1997)"],
    "cart": ["Return of the Jedi (1983)", "Star Wars (1977)"],
    "focused": [
        "Alien (1979)",
        "Aliens (1986)",
        "Blade Runner (1982)",
        "Terminator, The (1984)",
        "Empire Strikes Back, The (1980)",
    ],
    "scattered": [
        "Toy Story (1995)",
        "Fargo (1996)",
        "Sense and Sensibility (1995)",
        "Scream (1996)",
        "Titanic (1997)",
    ],
}


@dataclass(frozen=True)
class DemoData:
    """Interactions plus a catalogue with a title and '|'-joined genres per item."""

    name: str  # ML100K or SYNTHETIC
    events: pd.DataFrame  # user_id, item_id, timestamp
    items: pd.DataFrame  # item_id, title, genres
    note: str  # where the data came from, in one sentence
    source: dict  # for `SASRec.fit(source=...)`: lets evaluation and export re-read the same data
    _title: dict = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._title.update(zip(self.items["item_id"].tolist(), self.items["title"].tolist()))

    @property
    def is_movielens(self) -> bool:
        return self.name == ML100K

    def title(self, item_id) -> str:
        return self._title.get(item_id, f"item {item_id}")

    def titles(self, item_ids) -> list[str]:
        return [self.title(i) for i in item_ids]

    def ids(self, titles) -> list:
        """Item ids of exact titles; raises DataError naming a title that is not in the catalogue."""
        by_title = dict(zip(self.items["title"], self.items["item_id"]))
        missing = [t for t in titles if t not in by_title]
        if missing:
            raise DataError(f"not in the {self.name} catalogue: {missing}")
        return [int(by_title[t]) for t in titles]

    def example_sessions(self) -> dict[str, list]:
        """`viewed` (3 items), `cart` (2), `focused` (5 from one genre) and `scattered` (5 from different genres).

        On MovieLens these are the titles in ML100K_SESSIONS; on synthetic data, the most popular items of one
        category (viewed, cart, focused) and of five different categories (scattered)."""
        if self.is_movielens:
            return {name: self.ids(titles) for name, titles in ML100K_SESSIONS.items()}
        counts = self.events["item_id"].value_counts()
        genre = self.items.set_index("item_id")["genres"]
        by_genre = {g: [i for i in counts.index if genre[i] == g] for g in genre.loc[counts.index[:50]].unique()}
        first, *others = by_genre
        return {
            "viewed": by_genre[first][:3],
            "cart": by_genre[first][3:5],
            "focused": by_genre[first][:5],
            "scattered": [by_genre[g][0] for g in others[:5]],
        }


def load_demo_data(
    data: str = "auto",
    *,
    download: bool = True,
    synthetic_users: int = 3_000,
    synthetic_items: int = 1_000,
    seed: int = 0,
    log=logs.info,
) -> DemoData:
    """`data="auto"`: ML-100K from `$SASREC_DATA_DIR`, else the cache, else downloaded (when `download`), else
    the synthetic sessions; `data="synthetic"` goes straight to them. `log` says which one was taken, and why."""
    if data not in ("auto", SYNTHETIC):
        raise DataError(f"data must be 'auto' or 'synthetic', got {data!r}")
    reason = "data='synthetic' was asked for"
    if data == "auto":
        try:
            folder = movielens.ml100k_dir(download=download)
            ratings = movielens.load_ml100k(folder)
            items = movielens.load_ml100k_items(folder)
        except DataError as e:
            reason = f"MovieLens-100K is not available ({e})"
        else:
            note = f"{ML100K} from {folder}: {len(ratings):,} ratings, {len(items):,} movies"
            log(note)
            events = ratings[["user_id", "item_id", "timestamp"]]
            return DemoData(ML100K, events, items, note, {"format": "ml-100k", "path": str(folder)})
    sessions = synthetic.generate_sessions(n_users=synthetic_users, n_items=synthetic_items, seed=seed)
    cat = sessions.item_category
    items = pd.DataFrame(
        {
            "item_id": cat["item_id"].to_numpy(),
            "title": [f"item {i}" for i in cat["item_id"]],
            "genres": [f"category {c}" for c in cat["category"]],
        }
    )
    note = (
        f"SYNTHETIC DATA, not MovieLens: {reason}. Using {synthetic_users:,} generated sessions over "
        f"{synthetic_items:,} items in {cat['category'].nunique()} categories; titles are 'item N' and genres "
        "'category C'."
    )
    log(note)
    return DemoData(SYNTHETIC, sessions.events, items, note, {"format": "dataframe"})


def most_specific_genre(items: pd.DataFrame) -> pd.Series:
    """One genre per item for colouring plots: of its genres, the one fewest items have ('unknown' if none)."""
    split = items["genres"].str.split("|")
    counts = pd.Series([g for gs in split for g in gs if g]).value_counts()
    pick = [min((g for g in gs if g), key=lambda g: (counts[g], g), default="unknown") for gs in split]
    return pd.Series(pick, index=items["item_id"].to_numpy(), name="genre")


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of how often each catalogue item is recommended: 0 all equally, 1 one item only."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))
