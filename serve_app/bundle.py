"""Serving side of the model bundle: resolve an alias, download a version once, verify, load.

No serving logic and no training code: stages build themselves from the `Bundle` returned here.
Nothing here unpickles (npy/npz with allow_pickle=False, FAISS and XGBoost formats, JSON).

Memory: the catalog-sized arrays (item ids, embeddings, features, categories, the user tower's
history table in `user_tower.npz`) and the FAISS index are memory-mapped read-only after the
checksums are verified, so every replica and version on a node shares one copy in the page cache
instead of holding its own; ids are looked up through `serve_app.ids.ItemIndex`, never a dict. A
bundle's files must not change while it is loaded: the cache only ever adds or removes whole
directories (a removed file stays readable through its mapping).

Verification rules (`verify_bundle`): the manifest must parse, carry a known `format_version` and
list every required file; every listed file must exist with the listed sha256. Files present but not
listed are ignored: the loader never opens them, so they cannot change what is served (and a stray
file left by a copy tool cannot take a bundle down).

The manifest itself is anchored in the registry (`check_manifest_digest`): registration tags the model
version with the sha256 of the manifest it uploaded (`MANIFEST_SHA256_TAG`), and a download whose
manifest has another digest is refused, so rewriting files and manifest together in the artifact store
is caught too. A version without the tag (registered before recserve recorded it, or by hand) is
refused unless `models.allow_untagged`. The check runs once, at download, and a cache hit never
contacts MLflow: the cache holds copies that passed it (or were taken in while `allow_untagged` was on,
or by a release before the check: clear the cache directory when that matters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from pydantic import ValidationError

from serve_app.contract import Collaborative
from serve_app.errors import BundleIntegrityError, ModelUnavailable
from serve_app.ids import ItemIndex
from serve_app.imports import import_xgboost
from serve_app.schemas import (
    BUNDLE_FILES,
    MANIFEST_SHA256_TAG,
    READABLE_FORMAT_VERSIONS,
    USER_TOWER_WEIGHT_NAMES,
    USER_TOWER_WEIGHTS_FILE,
    BundleManifest,
)

if TYPE_CHECKING:  # loaded lazily: a stage imports only the libraries of its artifacts
    import faiss
    import xgboost as xgb

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Search-time knobs a manifest may carry in `index.params`; build-time ones (nlist, M) are ignored.
# Manifest index params (training.index.index_params) -> FAISS ParameterSpace names.
SEARCH_PARAMS = {
    "nprobe": "nprobe",
    "ef_search": "efSearch",
    "efSearch": "efSearch",
    "k_factor": "k_factor_rf",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _is_safe_name(part: str) -> bool:
    """A name that stays one path component inside its directory (file, model or version name)."""
    return bool(_SAFE_NAME.match(part)) and part not in (".", "..")


@dataclass(frozen=True, eq=False)
class Bundle:
    """One loaded model version. Arrays are read-only: replicas share them and must not mutate.

    `eq=False`: identity comparison and hashing, so a bundle can key a cache (arrays have no `==`).
    """

    path: Path
    manifest: BundleManifest
    user_tower_weights: dict[str, np.ndarray]  # user_tower.npz (the numpy tower's arrays)
    item_ids: np.ndarray  # unicode [n]
    item_embeddings: np.ndarray  # float32 [n, d], L2-normalised by training
    item_features: np.ndarray  # float32 [n, f], columns = manifest.item_feature_names
    item_categories: np.ndarray  # int32 [n], indexes manifest.categories
    index: faiss.Index
    ranker: xgb.Booster
    popularity: dict[str, Any]  # {"global": [item_id...], "by_category": {category: [item_id...]}}
    item_index: ItemIndex  # item_id -> row
    collaborative: Collaborative | None = None  # manifest.collaborative, when the bundle has it

    @property
    def version(self) -> str | None:
        return self.manifest.model_version


# --- verification -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> BundleManifest:
    """Parse a bundle's manifest; every way it can be unreadable becomes BundleIntegrityError."""
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleIntegrityError(f"missing in {path}", file=MANIFEST_NAME) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleIntegrityError(f"unreadable: {exc}", file=MANIFEST_NAME) from None
    # Check the version before the schema: a future format may not validate against this one.
    if not isinstance(raw, dict):
        raise BundleIntegrityError("not a JSON object", file=MANIFEST_NAME)
    if raw.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise BundleIntegrityError(
            f"unknown format_version {raw.get('format_version')!r} "
            f"(this server reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})",
            file=MANIFEST_NAME,
        )
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleIntegrityError(
            f"invalid field '{where}': {first['msg']}", file=MANIFEST_NAME
        ) from None


def verify_bundle(path: str | Path) -> BundleManifest:
    """Check a bundle directory against its manifest; return it, or raise naming the bad file."""
    directory = Path(path)
    if not directory.is_dir():
        raise BundleIntegrityError(f"bundle directory {directory} does not exist")
    manifest = read_manifest(directory)
    if USER_TOWER_WEIGHTS_FILE not in manifest.files:
        # Format 1 bundles may carry the tower only as TorchScript, which serving no longer runs.
        raise BundleIntegrityError(
            f"not listed in {MANIFEST_NAME}: this server runs the user tower from "
            f"{USER_TOWER_WEIGHTS_FILE} only (a bundle with just user_tower.pt must be exported "
            "again by a current training run)",
            file=USER_TOWER_WEIGHTS_FILE,
        )
    for name in BUNDLE_FILES:
        if name not in manifest.files:
            raise BundleIntegrityError(f"required file not listed in {MANIFEST_NAME}", file=name)
    for name, expected in sorted(manifest.files.items()):
        # Names come from a downloaded file: never let one point outside the bundle directory.
        if not _is_safe_name(name):
            raise BundleIntegrityError("unsafe file name in manifest", file=name)
        file_path = directory / name
        if not file_path.is_file():
            raise BundleIntegrityError(f"missing from {directory}", file=name)
        actual = _sha256(file_path)
        if actual != expected:
            raise BundleIntegrityError(
                f"checksum mismatch (manifest {expected[:12]}..., file {actual[:12]}...)", file=name
            )
    return manifest


def manifest_sha256(path: str | Path) -> str:
    """Hex sha256 of a bundle directory's `manifest.json`, byte for byte as downloaded."""
    try:
        return _sha256(Path(path) / MANIFEST_NAME)
    except FileNotFoundError:
        raise BundleIntegrityError(f"missing in {path}", file=MANIFEST_NAME) from None
    except OSError as exc:
        raise BundleIntegrityError(f"unreadable: {exc}", file=MANIFEST_NAME) from None


def check_manifest_digest(
    path: str | Path, pinned: str | None, version: str, *, allow_untagged: bool = False
) -> None:
    """Refuse a downloaded bundle whose manifest is not the one registered as `version`.

    `pinned`: the version's `MANIFEST_SHA256_TAG` in the registry (None: the version has none, and
    is refused unless `allow_untagged`). The manifest's per-file checksums (`verify_bundle`) then
    carry the check to every file.
    """
    if pinned is None:
        if allow_untagged:
            logger.warning(
                "version %s has no %s tag: its manifest is not pinned (models.allow_untagged)",
                version,
                MANIFEST_SHA256_TAG,
            )
            return
        raise BundleIntegrityError(
            f"version {version} has no {MANIFEST_SHA256_TAG} tag in the registry (registered "
            "before manifest digests were recorded, or not by recserve), so its manifest cannot "
            "be checked: register it again, or set models.allow_untagged=true to serve it unpinned",
            file=MANIFEST_NAME,
        )
    actual = manifest_sha256(path)
    if actual != pinned.strip().lower():
        raise BundleIntegrityError(
            f"sha256 {actual[:12]}... does not match the {MANIFEST_SHA256_TAG} tag "
            f"{pinned.strip()[:12]}... recorded when version {version} was registered: the "
            "bundle was changed in the artifact store after registration",
            file=MANIFEST_NAME,
        )


# --- registry ---------------------------------------------------------------------------------


def _client(tracking_uri: str) -> Any:
    # Imported here: MLflow costs seconds to import and loading a cached bundle never needs it.
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_alias(tracking_uri: str, model_name: str, alias: str) -> str:
    """The model version an alias (`champion`, `challenger`) points at; ModelUnavailable if none."""
    from mlflow.exceptions import MlflowException

    try:
        model = _client(tracking_uri).get_registered_model(model_name)
    except MlflowException as exc:
        raise ModelUnavailable(f"registry lookup of model '{model_name}' failed: {exc}") from exc
    version = model.aliases.get(alias)
    if version is None:
        known = ", ".join(sorted(model.aliases)) or "none"
        raise ModelUnavailable(f"model '{model_name}' has no alias '{alias}' (aliases: {known})")
    return str(version)


def resolve_ref(tracking_uri: str, model_name: str, ref: str) -> str:
    """A version number (checked to exist) or an alias, as a version; ModelUnavailable if neither."""
    if not ref.isdigit():
        return resolve_alias(tracking_uri, model_name, ref)
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(tracking_uri).get_model_version(model_name, ref).version)
    except MlflowException as exc:
        raise ModelUnavailable(f"model '{model_name}' has no version {ref}: {exc}") from exc


def _cache_path(model_name: str, version: str, cache_dir: str | Path) -> Path:
    for part in (model_name, str(version)):
        if not _is_safe_name(part):
            raise ModelUnavailable(f"unsafe model name or version for a cache path: {part!r}")
    return Path(cache_dir) / model_name / str(version)


def cached_bundle(model_name: str, version: str, cache_dir: str | Path) -> Path | None:
    """The cached copy of a version if it verifies, else None (a copy that no longer verifies is
    removed); never contacts MLflow."""
    target = _cache_path(model_name, version, cache_dir)
    if not target.is_dir():
        return None
    try:
        verify_bundle(target)
        return target
    except BundleIntegrityError as exc:
        logger.warning("cached bundle %s failed verification (%s); downloading again", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        return None


SERVING_HINT = "serving.json"


def write_serving_hint(model_name: str, versions: Iterable[str], cache_dir: str | Path) -> None:
    """Record, beside the cached bundles, the versions the router serves now (replaced atomically):
    a stage replica that starts later (a restart, a scale-up) loads them from the cache before its
    first request instead of asking the registry. Only a hint: a stage loads any version on demand."""
    names = sorted({str(v) for v in versions})
    for name in names:
        _cache_path(model_name, name, cache_dir)  # refuses an unsafe name
    parent = Path(cache_dir) / model_name
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{SERVING_HINT}.{os.getpid()}"
    staging.write_text(json.dumps({"versions": names}))
    staging.replace(parent / SERVING_HINT)


def read_serving_hint(model_name: str, cache_dir: str | Path) -> list[str]:
    """The versions of the last `write_serving_hint` that this node has cached ([] without a hint,
    on a first start or another node, or with an unreadable one). Not verified here: loading a
    version verifies its cached copy (`cached_bundle`), once."""
    path = Path(cache_dir) / model_name / SERVING_HINT
    try:
        names = json.loads(path.read_text())["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(names, list):
        return []
    return [
        name
        for name in names
        if isinstance(name, str) and _is_safe_name(name) and (path.parent / name).is_dir()
    ]


def fetch_bundle(
    tracking_uri: str,
    model_name: str,
    version: str,
    cache_dir: str | Path,
    *,
    allow_untagged: bool = False,
) -> Path:
    """Local, verified copy of a registered version at `cache_dir/<model_name>/<version>/`.

    Downloaded once: into a temporary sibling, verified there (its manifest against the version's
    `MANIFEST_SHA256_TAG`, then every file against the manifest), then renamed into place, so the
    cache never holds a partial or unverified bundle and a cache hit never contacts MLflow. Two
    processes racing on the same version both download; the first rename wins, the other discards.
    A cached copy that no longer verifies (disk corruption, hand edits) is replaced by a fresh one.
    """
    cached = cached_bundle(model_name, version, cache_dir)
    if cached is not None:
        return cached
    target = _cache_path(model_name, version, cache_dir)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=parent))
    try:
        downloaded, pinned = _download(tracking_uri, model_name, str(version), staging)
        check_manifest_digest(downloaded, pinned, str(version), allow_untagged=allow_untagged)
        manifest = verify_bundle(downloaded)
        if manifest.model_version is not None and manifest.model_version != str(version):
            raise BundleIntegrityError(
                f"manifest says model_version {manifest.model_version}, registry says {version}",
                file=MANIFEST_NAME,
            )
        try:
            os.rename(downloaded, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same download first; its copy was verified too.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(
    tracking_uri: str, model_name: str, version: str, destination: Path
) -> tuple[Path, str | None]:
    """The downloaded bundle directory and the version's `MANIFEST_SHA256_TAG` (None: untagged)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        client = _client(tracking_uri)
        pinned = client.get_model_version(model_name, version).tags.get(MANIFEST_SHA256_TAG)
        # Resolved through our own client: a `models:/` URI would be looked up in MLflow's global
        # registry URI, not the one this server was configured with.
        source = client.get_model_version_download_uri(model_name, version)
        path = download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri
        )
    except (MlflowException, OSError) as exc:
        raise ModelUnavailable(f"download of {model_name} v{version} failed: {exc}") from exc
    return Path(path), (str(pinned) if pinned else None)


# --- loading ----------------------------------------------------------------------------------


def _load_npy(directory: Path, name: str, *, mmap: bool = True) -> np.ndarray:
    """A verified .npy, memory-mapped read-only by default (a plain ndarray viewing the map)."""
    try:
        array = np.load(directory / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: refused, never unpickled
        raise BundleIntegrityError(f"not a plain numeric/unicode array: {exc}", file=name) from None
    if not isinstance(array, np.ndarray):
        raise BundleIntegrityError("expected a single .npy array", file=name)
    array = np.asarray(array)  # np.memmap -> ndarray: slices and gathers are plain arrays
    array.flags.writeable = False
    return array


_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # PKZIP local file header, 30 bytes
_ZIP_LOCAL_SIGNATURE = 0x04034B50


def _npz_member(handle: Any, path: Path, info: zipfile.ZipInfo, name: str) -> np.ndarray | None:
    """One member of an .npz mapped in place, or None when it cannot be (compressed, encrypted):
    `np.savez` stores members uncompressed, each an .npy at a fixed offset of the archive."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    handle.seek(info.header_offset)
    header = handle.read(_ZIP_LOCAL_HEADER.size)
    if len(header) != _ZIP_LOCAL_HEADER.size:
        raise BundleIntegrityError("truncated zip member header", file=name)
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    if fields[0] != _ZIP_LOCAL_SIGNATURE:
        raise BundleIntegrityError("bad zip member header", file=name)
    start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
    handle.seek(start)
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        return None
    if dtype.hasobject:  # would need pickle: refused, never unpickled
        raise BundleIntegrityError(f"unreadable: {info.filename} is an object array", file=name)
    offset = handle.tell()
    if offset - start + int(np.prod(shape)) * dtype.itemsize > info.file_size:
        raise BundleIntegrityError(f"{info.filename} is shorter than its header says", file=name)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    mapped = np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )
    return np.asarray(mapped)


def _load_npz(directory: Path, name: str) -> dict[str, np.ndarray]:
    """The arrays of a verified .npz by name, without pickle; members stored uncompressed are
    memory-mapped read-only (shared through the page cache), any other is read into memory."""
    path = directory / name
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                array = _npz_member(handle, path, info, name)
                if array is None:
                    with archive.open(info) as member:
                        array = np.lib.format.read_array(member, allow_pickle=False)
                array.flags.writeable = False
                arrays[key] = array
    except BundleIntegrityError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleIntegrityError(f"unreadable: {exc}", file=name) from None
    return arrays


def _expect(array: np.ndarray, name: str, dtype: str, shape: tuple[int, ...]) -> None:
    """`dtype` is a numpy dtype name, or "unicode" for a str array of any width."""
    ok = array.dtype.kind == "U" if dtype == "unicode" else array.dtype == np.dtype(dtype)
    if not ok:
        raise BundleIntegrityError(f"dtype {array.dtype}, expected {dtype}", file=name)
    if array.shape != shape:
        raise BundleIntegrityError(f"shape {array.shape}, expected {shape}", file=name)


COLLABORATIVE_MATRICES = ("ease", "knn", "transitions", "basket")
# Matrices a bundle from before them lacks (its Collaborative then scores nothing with them).
OPTIONAL_MATRICES = ("basket",)


def _load_collaborative(directory: Path, manifest: BundleManifest, n: int) -> Collaborative:
    """The CSR matrices of `collaborative.npz`, checked like any other bundle array."""
    spec = manifest.collaborative
    name = str(spec.get("file", "collaborative.npz"))
    if name not in manifest.files:  # verify_bundle checked the listed files only
        raise BundleIntegrityError(f"not listed in {MANIFEST_NAME}", file=name)
    try:
        last_items, per_source = int(spec["last_items"]), int(spec["per_source"])
    except (KeyError, TypeError, ValueError):
        raise BundleIntegrityError(
            "collaborative lacks last_items/per_source", file="manifest.json"
        ) from None
    arrays = _load_npz(directory, name)
    matrices: dict[str, sp.csr_matrix] = {}
    for matrix in COLLABORATIVE_MATRICES:
        if matrix in OPTIONAL_MATRICES and f"{matrix}_indptr" not in arrays:
            continue
        try:
            indptr, indices, data = (
                arrays[f"{matrix}_{part}"] for part in ("indptr", "indices", "data")
            )
        except KeyError as exc:
            raise BundleIntegrityError(f"missing array {exc}", file=name) from None
        ok = (
            indptr.dtype == np.int64
            and indices.dtype == np.int32
            and data.dtype == np.float32
            and indptr.shape == (n + 1,)
            and indices.shape == data.shape
            and indptr[0] == 0
            and indptr[-1] == len(indices)
            and bool(np.all(np.diff(indptr) >= 0))
            and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < n))
        )
        if not ok:
            raise BundleIntegrityError(f"{matrix} is not a valid {n} x {n} CSR matrix", file=name)
        matrices[matrix] = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    return Collaborative(
        ease=matrices["ease"],
        knn=matrices["knn"],
        transitions=matrices["transitions"],
        last_items=last_items,
        per_source=per_source,
        basket=matrices.get("basket"),
        basket_items=int(spec.get("basket_items", 10)),
    )


def _apply_search_params(index: faiss.Index, params: dict[str, float | int | str]) -> None:
    import faiss

    space = faiss.ParameterSpace()
    for key, name in SEARCH_PARAMS.items():
        if key in params:
            try:
                space.set_index_parameter(index, name, float(params[key]))
            except RuntimeError as exc:
                raise BundleIntegrityError(
                    f"index param {key}={params[key]} not applicable: {exc}", file="index.faiss"
                ) from None


# One loader per artifact: a stage loads what it serves from and imports nothing else (the Ranker's
# process never imports torch or FAISS, the Retriever's never torch or XGBoost).


def load_item_ids(directory: Path, manifest: BundleManifest) -> tuple[np.ndarray, ItemIndex]:
    """`item_ids.npy` (memory-mapped) and its id -> row lookup (ids must be unique)."""
    item_ids = _load_npy(directory, "item_ids.npy")
    _expect(item_ids, "item_ids.npy", "unicode", (manifest.num_items,))
    try:
        item_index = ItemIndex.from_ids(item_ids)
    except ValueError as exc:
        raise BundleIntegrityError(str(exc), file="item_ids.npy") from None
    return item_ids, item_index


def load_item_embeddings(directory: Path, manifest: BundleManifest) -> np.ndarray:
    embeddings = _load_npy(directory, "item_embeddings.npy")
    _expect(
        embeddings, "item_embeddings.npy", "float32", (manifest.num_items, manifest.embedding_dim)
    )
    return embeddings


def load_item_features(directory: Path, manifest: BundleManifest) -> np.ndarray:
    features = _load_npy(directory, "item_features.npy")
    shape = (manifest.num_items, len(manifest.item_feature_names))
    _expect(features, "item_features.npy", "float32", shape)
    return features


def load_item_categories(directory: Path, manifest: BundleManifest) -> np.ndarray:
    categories = _load_npy(directory, "item_categories.npy")
    _expect(categories, "item_categories.npy", "int32", (manifest.num_items,))
    if manifest.num_items and (
        categories.min() < 0 or categories.max() >= len(manifest.categories)
    ):
        raise BundleIntegrityError(
            "category code outside manifest.categories", file="item_categories.npy"
        )
    return categories


def load_index(directory: Path, manifest: BundleManifest) -> faiss.Index:
    """The FAISS index (its own reader), with the manifest's search-time parameters. Its vectors
    (flat storage, HNSW's too) and graph are memory-mapped read-only, shared by every process on
    the node that maps the same file."""
    import faiss

    n, d = manifest.num_items, manifest.embedding_dim
    try:
        index = faiss.read_index(
            str(directory / "index.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        )
    except RuntimeError as exc:
        raise BundleIntegrityError(f"unreadable FAISS index: {exc}", file="index.faiss") from None
    if index.ntotal != n or index.d != d:
        raise BundleIntegrityError(
            f"index holds {index.ntotal} x {index.d}, manifest says {n} x {d}", file="index.faiss"
        )
    _apply_search_params(index, manifest.index.params)
    return index


def load_ranker(directory: Path, manifest: BundleManifest) -> xgb.Booster:
    """The XGBoost booster (UBJ), `nthread=1`: serving predicts small batches, where threads cost."""
    import_xgboost()
    import xgboost as xgb

    try:
        ranker = xgb.Booster(params={"nthread": 1}, model_file=str(directory / "ranker.ubj"))
    except xgb.core.XGBoostError as exc:
        raise BundleIntegrityError(f"unreadable XGBoost model: {exc}", file="ranker.ubj") from None
    if ranker.num_features() != len(manifest.ranker_features):
        raise BundleIntegrityError(
            f"ranker takes {ranker.num_features()} features, manifest lists "
            f"{len(manifest.ranker_features)}",
            file="ranker.ubj",
        )
    return ranker


def load_user_tower_weights(directory: Path, manifest: BundleManifest) -> dict[str, np.ndarray]:
    """The user tower's weights (`user_tower.npz`: float32, `USER_TOWER_WEIGHT_NAMES`, shapes that
    chain into [embedding_dim] vectors over this catalog), memory-mapped: the history table is
    [num_items + 1, H], 512 MB at a million items and H = 128."""
    name = USER_TOWER_WEIGHTS_FILE
    if name not in manifest.files:  # verify_bundle refuses such a bundle; a caller may not verify
        raise BundleIntegrityError(f"not listed in {MANIFEST_NAME}", file=name)
    weights = _load_npz(directory, name)
    if sorted(weights) != sorted(USER_TOWER_WEIGHT_NAMES):
        raise BundleIntegrityError(
            f"arrays {sorted(weights)}, expected {sorted(USER_TOWER_WEIGHT_NAMES)}", file=name
        )
    try:
        buckets = int(manifest.user_tower["user_buckets"])
        profile_dim = int(manifest.user_tower.get("profile_dim", 1 + len(manifest.categories)))
    except (KeyError, TypeError, ValueError):
        raise BundleIntegrityError("user_tower lacks user_buckets", file=MANIFEST_NAME) from None
    h, d = int(weights["profile_proj.bias"].size), manifest.embedding_dim
    shapes = {
        "user_embedding.weight": (buckets + 1, h),
        "history_embedding.weight": (manifest.num_items + 1, h),
        "profile_proj.weight": (h, profile_dim),
        "profile_proj.bias": (h,),
        "mlp.0.weight": (h, 3 * h),
        "mlp.0.bias": (h,),
        "mlp.2.weight": (d, h),
        "mlp.2.bias": (d,),
    }
    for key, shape in shapes.items():
        array = weights[key]
        if array.dtype != np.float32 or array.shape != shape:
            raise BundleIntegrityError(
                f"{key} is {array.dtype} {array.shape}, expected float32 {shape}", file=name
            )
    return weights


def load_popularity(directory: Path) -> dict[str, Any]:
    try:
        popularity = json.loads((directory / "popularity.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleIntegrityError(f"unreadable: {exc}", file="popularity.json") from None
    if not isinstance(popularity, dict) or not isinstance(popularity.get("global"), list):
        raise BundleIntegrityError(
            "expected an object with a 'global' list", file="popularity.json"
        )
    return popularity


def load_collaborative(directory: Path, manifest: BundleManifest) -> Collaborative | None:
    """The collaborative models when the manifest lists them, else None."""
    if not manifest.collaborative:
        return None
    return _load_collaborative(directory, manifest, manifest.num_items)


def load_bundle(path: str | Path) -> Bundle:
    """Verify then load every artifact of a bundle directory into memory, checking their shapes
    (the in-process pipeline; each stage of the graph loads only its own artifacts)."""
    directory = Path(path)
    manifest = verify_bundle(directory)
    item_ids, item_index = load_item_ids(directory, manifest)
    return Bundle(
        path=directory,
        manifest=manifest,
        user_tower_weights=load_user_tower_weights(directory, manifest),
        item_ids=item_ids,
        item_embeddings=load_item_embeddings(directory, manifest),
        item_features=load_item_features(directory, manifest),
        item_categories=load_item_categories(directory, manifest),
        index=load_index(directory, manifest),
        ranker=load_ranker(directory, manifest),
        popularity=load_popularity(directory),
        item_index=item_index,
        collaborative=load_collaborative(directory, manifest),
    )
