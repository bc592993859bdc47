"""MovieLens importer: turns a public MovieLens directory (100K, 1M or latest) into a `Dataset`.

The format is detected from the file names. Choices every downstream stage inherits:

- Ratings become events. event_type by rating: >= 4.5 purchase, >= 3.5 add_to_cart, >= 2.5 click,
  below that view (integer ratings: 5 purchase, 4 add_to_cart, 3 click, 1-2 view; ML-latest's half
  stars fall into the band they round down to). A low rating is still an exposure, not a signal.
- weight = max(rating - 2, DEFAULT_EVENT_WEIGHTS["view"]): 5 -> 3.0, 4 -> 2.0, 3 -> 1.0 and
  1-2 -> 0.2, i.e. exactly the default weight of the event type the rating maps to, with half stars
  in between, so MovieLens and logged events train on the same scale.
- category = the movie's first genre as the file lists it ("unknown" when it has none; ML-latest's
  "(no genres listed)" counts as none); title = the movie title as given, year included.
- price = 0.0. created_at = the release date where the format has one (ML-100K), else the movie's
  first rating time, else (a movie nobody rated) the data set's first rating time.
- Ids stay the raw MovieLens ids as strings; events whose movie is not in the catalog are dropped.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from serve_app.schemas import DEFAULT_EVENT_WEIGHTS, EventType
from training.data import Dataset, normalize_catalog, normalize_events

log = logging.getLogger(__name__)

# The 19 genre flag columns of ML-100K's u.item, in file order (as listed in its u.genre).
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
UNKNOWN_GENRE = "unknown"
NO_GENRES_MARKER = "(no genres listed)"  # ML-latest's spelling of "no genre"

# format name -> (ratings file, movies file)
FORMATS: dict[str, tuple[str, str]] = {
    "100k": ("u.data", "u.item"),
    "1m": ("ratings.dat", "movies.dat"),
    "latest": ("ratings.csv", "movies.csv"),
}


def detect_format(path: Path) -> str:
    """Which MovieLens format `path` holds ("100k", "1m" or "latest"); ValueError if none."""
    for name, files in FORMATS.items():
        if all((path / f).is_file() for f in files):
            return name
    looked_for = "; ".join(f"{' + '.join(files)} (ML-{name})" for name, files in FORMATS.items())
    raise ValueError(f"no MovieLens data found in directory {path}: looked for {looked_for}")


def rating_event_types(ratings: np.ndarray) -> np.ndarray:
    """Event type per rating (see the module docstring for the bands)."""
    return np.select(
        [ratings >= 4.5, ratings >= 3.5, ratings >= 2.5],
        [EventType.PURCHASE.value, EventType.ADD_TO_CART.value, EventType.CLICK.value],
        default=EventType.VIEW.value,
    )


# Held out in an evaluation round, a rating counts as relevant from 4 stars: weight 4 - 2.
RELEVANT_MIN_WEIGHT = 2.0


def rating_weights(ratings: np.ndarray) -> np.ndarray:
    """Training weight per rating: rating - 2, floored at the default weight of a view."""
    floor = DEFAULT_EVENT_WEIGHTS[EventType.VIEW]
    return np.maximum(ratings.astype("float64") - 2.0, floor).astype("float32")


def first_genre(genres: str) -> str:
    """The first genre of a pipe-separated genre list, or "unknown"."""
    first = genres.split("|", 1)[0].strip()
    return UNKNOWN_GENRE if first in ("", NO_GENRES_MARKER) else first


def _ratings_frame(
    users: pd.Series, items: pd.Series, ratings: pd.Series, ts: pd.Series
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": users.astype(str).str.strip(),
            "item_id": items.astype(str).str.strip(),
            "rating": pd.to_numeric(ratings).astype("float64"),
            "timestamp": pd.to_datetime(pd.to_numeric(ts), unit="s", utc=True),
        }
    )


def _no_dates(n: int) -> pd.Series:
    return pd.Series(pd.NaT, index=pd.RangeIndex(n), dtype="datetime64[ns, UTC]")


def _read_100k(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = pd.read_csv(path / "u.data", sep="\t", header=None, dtype=str)
    ratings = _ratings_frame(raw[0], raw[1], raw[2], raw[3])
    names = ["item_id", "title", "release", "video_release", "url", *ML100K_GENRES]
    items = pd.read_csv(
        path / "u.item",
        sep="|",
        header=None,
        names=names,
        encoding="latin-1",
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,  # titles carry literal quotes
    )
    flags = items[list(ML100K_GENRES)].apply(pd.to_numeric).to_numpy() == 1
    has_genre = flags.any(axis=1)
    category = np.where(has_genre, np.asarray(ML100K_GENRES)[flags.argmax(axis=1)], UNKNOWN_GENRE)
    movies = pd.DataFrame(
        {
            "item_id": items["item_id"].str.strip(),
            "title": items["title"].str.strip(),
            "category": category,
            # "01-Jan-1995"; blank for a few movies (then the first rating time is used)
            "release": pd.to_datetime(
                items["release"].str.strip(), format="%d-%b-%Y", errors="coerce", utc=True
            ),
        }
    )
    return ratings, movies


def _read_1m(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    # "1::1193::5::978300760": splitting on ':' keeps the fast C parser; fields are 0, 2, 4, 6.
    raw = pd.read_csv(path / "ratings.dat", sep=":", header=None, dtype=str)
    ratings = _ratings_frame(raw[0], raw[2], raw[4], raw[6])
    rows = []
    # Titles may contain ':' (and in principle '::'), so split off the id and genres only.
    for line in (path / "movies.dat").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        item_id, rest = line.split("::", 1)
        title, genres = rest.rsplit("::", 1)
        rows.append((item_id.strip(), title.strip(), first_genre(genres)))
    movies = pd.DataFrame(rows, columns=["item_id", "title", "category"])
    movies["release"] = _no_dates(len(movies))
    return ratings, movies


def _read_latest(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = pd.read_csv(path / "ratings.csv", dtype=str)
    ratings = _ratings_frame(raw["userId"], raw["movieId"], raw["rating"], raw["timestamp"])
    items = pd.read_csv(path / "movies.csv", dtype=str, keep_default_na=False, encoding="utf-8")
    movies = pd.DataFrame(
        {
            "item_id": items["movieId"].str.strip(),
            "title": items["title"].str.strip(),
            "category": items["genres"].map(first_genre),
            "release": _no_dates(len(items)),
        }
    )
    return ratings, movies


_READERS = {"100k": _read_100k, "1m": _read_1m, "latest": _read_latest}


def movielens_dataset(name: str, ratings: pd.DataFrame, movies: pd.DataFrame) -> Dataset:
    """Build the `Dataset` from parsed ratings (user_id, item_id, rating, timestamp) and movies
    (item_id, title, category, release: UTC timestamp or NaT)."""
    known = ratings["item_id"].isin(movies["item_id"])
    if not known.all():
        log.info("%s: dropped %d ratings of movies not in the catalog", name, int((~known).sum()))
    ratings = ratings.loc[known]
    rating = ratings["rating"].to_numpy()
    events = pd.DataFrame(
        {
            "user_id": ratings["user_id"],
            "item_id": ratings["item_id"],
            "event_type": rating_event_types(rating),
            "timestamp": ratings["timestamp"],
            "weight": rating_weights(rating),
        }
    )
    first_rating = ratings.groupby("item_id")["timestamp"].min()
    data_start = ratings["timestamp"].min() if len(ratings) else pd.Timestamp(0, tz="UTC")
    created_at = movies["release"].fillna(movies["item_id"].map(first_rating)).fillna(data_start)
    catalog = pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "category": movies["category"],
            "price": 0.0,
            "title": movies["title"],
            "created_at": created_at,
        }
    )
    return Dataset(
        name=f"movielens-{name}",
        events=normalize_events(events),
        catalog=normalize_catalog(catalog),
    )


def load_movielens(path: Path) -> Dataset:
    """Load the MovieLens directory `path` (ML-100K, ML-1M or ML-latest, auto-detected)."""
    path = Path(path)
    fmt = detect_format(path)
    ratings, movies = _READERS[fmt](path)
    dataset = movielens_dataset(fmt, ratings, movies)
    log.info(
        "loaded ML-%s from %s: %d events, %d users, %d movies",
        fmt,
        path,
        len(dataset.events),
        dataset.events["user_id"].nunique(),
        len(dataset.catalog),
    )
    return dataset
