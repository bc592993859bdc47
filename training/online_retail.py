"""Online Retail importer: turns the UCI "Online Retail" purchase log into a `Dataset` of purchases.

Cleaning keeps purchases by known customers of real products. The rules run in this fixed order and
each row is counted under the first rule it fails (so the counts add up to the rows dropped):
cancellation (InvoiceNo starting with "C"), quantity <= 0, unit price <= 0, missing customer,
non-product code (a product code starts with 5 digits; POST, DOT, M, C2, BANK CHARGES, gift
vouchers, ... do not). Counts are logged and returned in a `CleaningReport`.

Events: one "purchase" per kept invoice line (repeats kept; the evaluation protocol dedupes),
user_id = the customer number as an integer string, item_id = StockCode upper-cased and stripped
(so "85123a" and "85123A" are one product), session_id = InvoiceNo, weight = 1.0, timestamp =
InvoiceDate, a UK local time that is taken as UTC (at most one hour off in summer).

Catalog, from the kept rows only (notes like "damaged" live on the dropped ones): title = the most
frequent description (ties -> alphabetically first), price = median unit price, created_at = first
sale. The data set has no category column, so one is derived from the titles and named honestly as
a cluster: TF-IDF over title tokens (`serve_app.contract.title_tokens`, without digits and English
stop words), reduced to 100 dimensions by truncated SVD (LSA), then KMeans (scikit-learn, k=24,
fixed seed). Clusters are numbered by size (cat00 = largest) and named by the top 2 tokens of their
members' mean TF-IDF vector, e.g. "cat07_heart_holder". They are title-similarity groups, not a
merchandising taxonomy: the largest one is a catch-all of ~1k miscellaneous products.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer
from sklearn.preprocessing import normalize

from serve_app.contract import title_tokens
from serve_app.schemas import EventType
from training.data import Dataset, normalize_catalog, normalize_events

log = logging.getLogger(__name__)

RAW_COLUMNS = (
    "InvoiceNo",
    "StockCode",
    "Description",
    "Quantity",
    "InvoiceDate",
    "UnitPrice",
    "CustomerID",
)
# Cleaning rules in the order they are applied; `CleaningReport.dropped` follows this order.
CLEANING_RULES = (
    "cancellation",
    "quantity_not_positive",
    "price_not_positive",
    "missing_customer",
    "non_product_code",
)
PRODUCT_CODE_PATTERN = r"^\d{5}"
DEFAULT_CATEGORIES = 24
DEFAULT_SEED = 0
LSA_DIMS = 100


@dataclass(frozen=True)
class CleaningReport:
    """What cleaning did: rows read, rows dropped per rule (`CLEANING_RULES` order), rows left."""

    rows_in: int
    dropped: dict[str, int]
    rows_out: int
    customers: int
    products: int


def read_online_retail(path: Path) -> pd.DataFrame:
    """Read the raw file (.parquet, or .csv as exported from the UCI sheet) with its own columns."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        raw = pd.read_parquet(path)
    elif path.suffix.lower() == ".csv":
        text_columns = {"InvoiceNo": str, "StockCode": str, "Description": str}
        try:
            raw = pd.read_csv(path, dtype=text_columns, encoding="utf-8")
        except UnicodeDecodeError:
            # Some redistributed CSV copies of the sheet are Windows-1252/latin-1.
            raw = pd.read_csv(path, dtype=text_columns, encoding="latin-1")
    else:
        raise ValueError(f"{path}: expected a .parquet or .csv Online Retail file")
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: not an Online Retail file, missing column(s) {missing}")
    return raw


def _rule_masks(raw: pd.DataFrame) -> dict[str, pd.Series]:
    """One boolean 'fails this rule' mask per rule; NaN quantities/prices fail their rule."""
    code = raw["StockCode"].astype("string").str.strip().str.upper()
    return {
        "cancellation": raw["InvoiceNo"]
        .astype("string")
        .str.strip()
        .str.startswith("C")
        .fillna(False),
        "quantity_not_positive": ~(pd.to_numeric(raw["Quantity"], errors="coerce") > 0),
        "price_not_positive": ~(pd.to_numeric(raw["UnitPrice"], errors="coerce") > 0),
        "missing_customer": pd.to_numeric(raw["CustomerID"], errors="coerce").isna(),
        "non_product_code": ~code.str.contains(PRODUCT_CODE_PATTERN, regex=True).fillna(False),
    }


def clean_online_retail(raw: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply the cleaning rules in order; return the kept lines (canonical columns) and drop counts.

    Kept columns: invoice, item_id, description (stripped, may be NaN), quantity, price,
    user_id, timestamp (UTC).
    """
    keep = pd.Series(True, index=raw.index)
    dropped: dict[str, int] = {}
    for rule, fails in _rule_masks(raw).items():
        drop = keep & fails.astype(bool)
        dropped[rule] = int(drop.sum())
        keep &= ~drop
    rows = raw.loc[keep]
    customer = pd.to_numeric(rows["CustomerID"]).astype("int64")
    timestamp = rows["InvoiceDate"]
    if not pd.api.types.is_datetime64_any_dtype(timestamp):
        timestamp = pd.to_datetime(timestamp.astype(str).str.strip(), format="ISO8601")
    description = rows["Description"].astype("string").str.strip()
    kept = pd.DataFrame(
        {
            "invoice": rows["InvoiceNo"].astype(str).str.strip(),
            "item_id": rows["StockCode"].astype(str).str.strip().str.upper(),
            "description": description.mask(description == ""),
            "quantity": pd.to_numeric(rows["Quantity"]),
            "price": pd.to_numeric(rows["UnitPrice"]).astype("float64"),
            "user_id": customer.astype(str),
            # UK local time taken as UTC (see the module docstring).
            "timestamp": timestamp.dt.tz_localize("UTC")
            if timestamp.dt.tz is None
            else timestamp.dt.tz_convert("UTC"),
        }
    ).reset_index(drop=True)
    return kept, dropped


def _title_analyzer(title: str) -> list[str]:
    # Digits ("SET OF 3") and stop words carry no kind-of-product signal and would name clusters.
    return [
        t
        for t in title_tokens(title)
        if not t.isdigit() and len(t) > 1 and t not in ENGLISH_STOP_WORDS
    ]


def title_categories(
    titles: Sequence[str], n_categories: int = DEFAULT_CATEGORIES, seed: int = DEFAULT_SEED
) -> list[str]:
    """A category per title: KMeans clusters of LSA-reduced TF-IDF vectors, named "catNN_tok1_tok2".

    Clusters are numbered by size, largest first (ties by KMeans label); the name carries the two
    heaviest tokens of the members' mean TF-IDF vector (ties alphabetical; fewer tokens if it has
    fewer, "misc" if none). k is capped at the number of distinct token lists, so a tiny catalog
    gets fewer, never empty, clusters.
    """
    if len(titles) == 0:
        return []
    distinct = len({tuple(_title_analyzer(t)) for t in titles})
    k = max(1, min(n_categories, distinct))
    vectorizer = TfidfVectorizer(analyzer=_title_analyzer)
    try:
        matrix = vectorizer.fit_transform(titles)
    except ValueError:  # not a single usable token in any title
        return ["cat00_misc"] * len(titles)
    # KMeans straight on ~2k sparse dims leaves a third of the catalog in one catch-all cluster;
    # the usual LSA step (truncated SVD, re-normalised) shrinks it to about a quarter.
    dims = min(LSA_DIMS, matrix.shape[1] - 1, matrix.shape[0] - 1)
    points = (
        normalize(TruncatedSVD(dims, random_state=seed).fit_transform(matrix))
        if dims >= 2
        else matrix
    )
    labels = (
        KMeans(n_clusters=k, random_state=seed, n_init=4).fit_predict(points).astype(np.int64)
        if k > 1
        else np.zeros(len(titles), dtype=np.int64)
    )
    # Names come from the members' mean TF-IDF vector, i.e. from the titles themselves.
    centroids = np.vstack([np.asarray(matrix[labels == c].mean(axis=0)) for c in range(k)])
    vocab = vectorizer.get_feature_names_out()
    sizes = np.bincount(labels, minlength=k)
    by_size = np.argsort(-sizes, kind="stable")  # new number -> old label
    names = {}
    for number, label in enumerate(by_size):
        weights = centroids[label]
        # Heaviest first, ties alphabetical (vocab is sorted, so a stable sort on -weight does it).
        top = [vocab[i] for i in np.argsort(-weights, kind="stable")[:2] if weights[i] > 0]
        names[int(label)] = f"cat{number:02d}_" + ("_".join(top) if top else "misc")
    return [names[int(label)] for label in labels]


def online_retail_catalog(
    kept: pd.DataFrame, n_categories: int = DEFAULT_CATEGORIES, seed: int = DEFAULT_SEED
) -> pd.DataFrame:
    """Catalog rows from the kept lines: title, median price, first sale, derived category."""
    counts = (
        kept.dropna(subset=["description"])
        .groupby(["item_id", "description"], observed=True)
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["item_id", "n", "description"], ascending=[True, False, True], kind="stable")
    )
    titles = counts.drop_duplicates("item_id").set_index("item_id")["description"]
    by_item = kept.groupby("item_id", sort=True)
    catalog = pd.DataFrame(
        {
            "price": by_item["price"].median(),
            "created_at": by_item["timestamp"].min(),
        }
    )
    catalog["title"] = titles.reindex(catalog.index).fillna("").astype(str)
    catalog["category"] = title_categories(catalog["title"].tolist(), n_categories, seed)
    return catalog.rename_axis("item_id").reset_index()


def load_online_retail(
    path: Path, n_categories: int = DEFAULT_CATEGORIES, seed: int = DEFAULT_SEED
) -> tuple[Dataset, CleaningReport]:
    """Load and clean the Online Retail file at `path` (.parquet or .csv)."""
    raw = read_online_retail(path)
    kept, dropped = clean_online_retail(raw)
    events = pd.DataFrame(
        {
            "user_id": kept["user_id"],
            "item_id": kept["item_id"],
            "event_type": EventType.PURCHASE.value,
            "timestamp": kept["timestamp"],
            "session_id": kept["invoice"],
            "weight": 1.0,
        }
    )
    catalog = online_retail_catalog(kept, n_categories, seed)
    report = CleaningReport(
        rows_in=len(raw),
        dropped=dropped,
        rows_out=len(kept),
        customers=int(kept["user_id"].nunique()),
        products=int(kept["item_id"].nunique()),
    )
    for rule, count in dropped.items():
        log.info("online retail: rule %s dropped %d rows", rule, count)
    log.info(
        "online retail: %d rows in, %d kept, %d customers, %d products",
        report.rows_in,
        report.rows_out,
        report.customers,
        report.products,
    )
    dataset = Dataset(
        name="online-retail",
        events=normalize_events(events),
        catalog=normalize_catalog(catalog),
    )
    return dataset, report
