"""Download the challenge FineWeb token shards and tokenizer from the Hugging Face hub (upstream-compatible CLI).

    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 128
    python data/cached_challenge_fineweb.py --variant sp1024 10        # a bare N works too, as upstream
    python data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 80

Same env vars, hub layout and local layout as upstream's data/cached_challenge_fineweb.py: dataset repo
MATCHED_FINEWEB_REPO_ID, root prefix MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default `datasets`), and a remote
`<prefix>/X` lands at `data/X` (`datasets/fineweb10B_<variant>/fineweb_{val,train}_%06d.bin`, `tokenizers/...`,
`docs_selected.jsonl`). Unlike upstream: the repo defaults per variant (sp4096/sp8192 are not on the official repo);
the manifest is cached per repo (data/manifest.<repo>.json), so switching repos never reuses a stale one; every shard,
downloaded or already present, is checked (header, exact size, manifest size/sha256 when given) and a bad one is
deleted and re-fetched once, bypassing the HF cache; hub failures are one-line errors. HF_ENDPOINT and HF_HUB_CACHE
are read when main() runs, not when huggingface_hub is imported.

The CaseOps variant (record N's lossless-case SP8192 data, docs/data.md) also has one byte sidecar per val shard,
`fineweb_val_bytes_%06d.bin`, fetched and verified like a shard and checked to hold exactly one entry per val token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from tqdm import tqdm

from data.shards import ShardError, read_shard_header, sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_PREFIX = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # upstream default: 80 x 1e8 tokens = 8 B tokens
# Where each variant is hosted: the official repo only carries sp1024; @kevclark's exports carry sp4096 and sp8192
# (the sp8192 record stack's data); @romeerp's export carries the CaseOps sp8192 data of PR #1729 and record N.
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
VARIANT_REPOS = {
    "sp1024": "willdepueoai/parameter-golf",
    "sp4096": "kevclark/parameter-golf",
    "sp8192": "kevclark/parameter-golf",
    CASEOPS_VARIANT: "romeerp/parameter-golf-caseops-v1",
}
SIDECAR_VARIANTS = {CASEOPS_VARIANT}  # val shards come with byte sidecars fineweb_val_bytes_%06d.bin
PROBE_TIMEOUT_S = 10.0
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")


class DownloadError(Exception):
    """A failure the user can act on: main() prints it as one line and exits non-zero."""


class HubUnreachable(DownloadError):
    """The hub did not answer at all (network, DNS, proxy, offline mode)."""


class MissingOnHub(DownloadError):
    """The hub answered, and the file is not in the repo."""


class BadTransfer(Exception):
    """A transfer that arrived incomplete or failed mid-way; handled like a corrupt file (one forced re-fetch)."""


def note(msg: str) -> None:
    """A warning or notice on stderr that does not break the progress bar."""
    tqdm.write(msg, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and its causes, outermost first (huggingface_hub wraps transport errors in its own)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _is_transport_error(exc: BaseException) -> bool:
    # huggingface_hub's HTTP stack moved requests -> httpx -> httpx2; match its transport errors by module instead of
    # importing one of them. HTTP status errors never reach here: they are wrapped in HfHubHTTPError, checked first.
    return type(exc).__module__.partition(".")[0] in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


@dataclass
class Hub:
    """One dataset repo on one endpoint; every hub call of a run goes through download()."""

    repo_id: str
    prefix: str
    endpoint: str
    cache_dir: str | None
    _probed: bool = field(default=False, init=False, repr=False)
    _probe_error: str | None = field(default=None, init=False, repr=False)  # set once: why the endpoint is unreachable

    def remote(self, inner: str) -> str:
        return f"{self.prefix}/{inner}" if self.prefix else inner

    def unreachable(self, reason: str) -> HubUnreachable:
        return HubUnreachable(
            f"cannot reach the Hugging Face hub at {self.endpoint} for dataset repo {self.repo_id} ({reason}); "
            "check the network/proxy or point HF_ENDPOINT at a reachable mirror; files already on disk can be "
            "verified without the hub by rerunning with --skip-manifest")

    def probe(self) -> None:
        """Fail fast when the endpoint does not answer: huggingface_hub would retry for ~25 s before giving up."""
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
            raise self.unreachable("HF_HUB_OFFLINE is set")
        if not self._probed:
            self._probed = True
            try:
                get_session().head(self.endpoint, timeout=PROBE_TIMEOUT_S)
            except Exception as e:  # any failure to get an HTTP answer at all means unreachable
                self._probe_error = _one_line(_chain(e)[-1])
        if self._probe_error is not None:
            raise self.unreachable(self._probe_error)

    def download(self, inner: str, force: bool) -> Path:
        """The file `<prefix>/<inner>` in the HF cache (force: fetch again even if cached); returns the real blob."""
        self.probe()
        try:
            path = hf_hub_download(repo_id=self.repo_id, filename=self.remote(inner), repo_type="dataset",
                                   endpoint=self.endpoint, cache_dir=self.cache_dir, force_download=force,
                                   library_name="pgolf")
        except Exception as e:
            raise self._translate(e, inner) from None
        return Path(path).resolve(strict=True)  # snapshot entries are symlinks to blobs

    def _translate(self, exc: Exception, inner: str) -> Exception:
        """Map huggingface_hub's exceptions to our one-line errors; anything unexpected is re-raised as is (a bug)."""
        chain, remote = _chain(exc), self.remote(inner)
        where = f"dataset repo {self.repo_id} on {self.endpoint}"
        if isinstance(exc, HFValidationError):
            return DownloadError(f"{where}: invalid repo id or path ({_one_line(exc)}); check MATCHED_FINEWEB_REPO_ID")
        for x in chain:  # specific hub answers first: each also carries the HTTP error it wraps
            if isinstance(x, RepositoryNotFoundError):  # also gated/private repos
                return DownloadError(f"{where}: repository not found, or private/gated (then log in with "
                                     "`hf auth login`); check MATCHED_FINEWEB_REPO_ID")
            if isinstance(x, RevisionNotFoundError):
                return DownloadError(f"{where}: revision not found ({_one_line(x)})")
            if isinstance(x, EntryNotFoundError) and not isinstance(x, LocalEntryNotFoundError):
                return MissingOnHub(f"{remote} is not in {where}")
            if isinstance(x, HfHubHTTPError):
                return DownloadError(f"{where}: the hub refused {remote}: {_one_line(x)}")
        if any(isinstance(x, LocalEntryNotFoundError | OfflineModeIsEnabled) or _is_transport_error(x)
               for x in chain):
            return self.unreachable(_one_line(chain[-1]))
        if isinstance(exc, OSError) or type(exc).__name__ == "XetDownloadError":  # e.g. "Consistency check failed"
            return BadTransfer(_one_line(exc))
        return exc


@dataclass(frozen=True)
class Item:
    """One file to make present and valid: `<prefix>/<inner>` on the hub, data_dir/<inner> here."""

    inner: str
    dest: Path
    shard: bool
    size: int | None = None  # from the manifest's optional `files` map
    sha256: str | None = None


def verify(item: Item) -> str | None:
    """None if item.dest is good, else the reason it is not."""
    path = item.dest
    try:
        if item.shard:
            read_shard_header(path)  # magic, version, exact size: the one implementation of the format
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        if item.size is not None and size != item.size:
            return f"{size} bytes, the manifest says {item.size}"
        if item.sha256 and sha256_file(path) != item.sha256.lower():
            return "sha256 differs from the manifest"
    except ShardError as e:
        return str(e).removeprefix(f"{path}: ")
    except OSError as e:
        return _one_line(e)
    return None


def place(src: Path, dest: Path) -> bool:
    """Hard-link the cache blob src at dest (copy if the filesystems differ), atomically. True if linked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
            linked = True
        except OSError:
            shutil.copyfile(src, tmp)
            linked = False
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return linked


def ensure(hub: Hub, item: Item, counts: Counter) -> None:
    """Make item.dest present and valid: keep a good local file, else (re-)download; at most one forced re-fetch."""
    dest = item.dest
    forced_first = False
    if dest.exists() or dest.is_symlink():
        why = verify(item)
        if why is None:
            counts["present"] += 1
            return
        note(f"{dest}: {why}; deleting it and downloading again")
        dest.unlink()
        forced_first = True  # dest is usually a hard link to the HF cache blob, so the cache holds the same bytes
    for forced in [True] if forced_first else [False, True]:
        try:
            if not place(hub.download(item.inner, force=forced), dest):
                counts["copied"] += 1
            why = verify(item)
        except BadTransfer as e:
            why = str(e)
        if why is None:
            counts["re-fetched" if forced else "downloaded"] += 1
            return
        dest.unlink(missing_ok=True)
        if not forced:
            note(f"{hub.remote(item.inner)}: downloaded copy is bad ({why}); fetching it again, bypassing the "
                       "HF cache")
    raise DownloadError(f"{dest}: still bad after a forced re-download from {hub.repo_id} ({why}); the hub copy "
                        "may be corrupt: retry later, or report it to the repo owner")


def manifest_cache_path(data_dir: Path, repo_id: str, prefix: str) -> Path:
    """data/manifest.<repo>.json: keyed by repo (and prefix) so another repo's manifest is never reused."""
    key = repo_id.replace("/", "__") + ("" if prefix == DEFAULT_PREFIX else f"@{prefix or 'root'}")
    return data_dir / f"manifest.{re.sub(r'[^A-Za-z0-9._@-]', '_', key)}.json"


def load_manifest(hub: Hub, data_dir: Path) -> dict:
    """The repo's manifest, fetched fresh; the per-repo cached copy is used only when the hub is unreachable."""
    cached = manifest_cache_path(data_dir, hub.repo_id, hub.prefix)
    try:
        text = hub.download("manifest.json", force=False).read_text(encoding="utf-8")
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, cached)
    except HubUnreachable as e:
        if not cached.is_file():
            raise
        note(f"warning: {e}\nwarning: using the manifest cached for {hub.repo_id} at {cached}")
        text = cached.read_text(encoding="utf-8")
    except MissingOnHub as e:
        raise DownloadError(f"{e}; check MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, or pass --skip-manifest to derive the "
                            "file names from the variant") from None
    except BadTransfer as e:
        raise DownloadError(f"{hub.remote('manifest.json')} from {hub.repo_id}: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DownloadError(f"{hub.remote('manifest.json')} from {hub.repo_id} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"{hub.remote('manifest.json')} from {hub.repo_id} is not a JSON object")
    return manifest


def safe_dest(data_dir: Path, inner: str) -> Path:
    """data_dir/inner, refusing manifest paths that would escape data_dir."""
    dest = (data_dir / inner).resolve()
    if Path(inner).is_absolute() or not dest.is_relative_to(data_dir.resolve()):
        raise DownloadError(f"manifest path {inner!r} points outside {data_dir}; refusing it")
    return data_dir / inner


def plan_from_manifest(manifest: dict, hub: Hub, variant: str, n_train: int, data_dir: Path) -> tuple[list[Item], dict]:
    """(files to fetch, the dataset entry's stats) for a variant, per the repo's manifest."""
    name = f"fineweb10B_{variant}"
    datasets = [d for d in manifest.get("datasets") or [] if isinstance(d, dict)]
    entry = next((d for d in datasets if d.get("name") == name), None)
    if entry is None:
        have = sorted(str(d.get("name", "?")).removeprefix("fineweb10B_") for d in datasets)
        hint = ""
        if VARIANT_REPOS.get(variant, hub.repo_id) != hub.repo_id:
            hint = f"; {variant} is hosted on {VARIANT_REPOS[variant]} (unset MATCHED_FINEWEB_REPO_ID or set it to that)"
        raise DownloadError(f"the manifest of {hub.repo_id} has no dataset {name}; it has: "
                            f"{', '.join(have) or 'none'}{hint}")
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"the manifest entry {name} of {hub.repo_id} lacks stats.files_val/files_train") from None
    if n_train > files_train:
        raise DownloadError(f"{variant} has only {files_train} train shards on {hub.repo_id}; requested {n_train}")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers") or [] if isinstance(t, dict) and t.get("name") == tok_name), None)
    artifacts = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok and tok.get(k)]
    if not artifacts:
        raise DownloadError(f"the manifest of {hub.repo_id} lists no tokenizer files for {name} "
                            f"(tokenizer_name={tok_name!r})")
    # Optional pgolf extension: top-level "files": {"<path under prefix>": {"bytes": int, "sha256": hex}}.
    # Upstream manifests carry none, so their shards get the header/size check only.
    facts = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}

    def item(inner: str, shard: bool) -> Item:
        f = facts.get(inner) if isinstance(facts.get(inner), dict) else {}
        size = f.get("bytes", f.get("size"))
        return Item(inner, safe_dest(data_dir, inner), shard, int(size) if size is not None else None, f.get("sha256"))

    shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    if variant in SIDECAR_VARIANTS or entry.get("val_bytes_glob"):  # upstream's exporter names its sidecars there
        shards += [f"datasets/{name}/fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
    shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(n_train)]
    return [item(s, True) for s in shards] + [item(a, False) for a in artifacts], stats


def plan_without_manifest(variant: str, n_train: int, data_dir: Path) -> list[Item]:
    """--skip-manifest: names derived from the variant (sp<V>[_suffix] -> tokenizers/fineweb_<V>_bpe[_suffix].model).
    One val shard holds the whole val split for every SP variant; the train count cannot be checked up front, so a
    missing shard fails when it is reached."""
    name = f"fineweb10B_{variant}"
    vocab, suffix = re.fullmatch(r"sp(\d+)(.*)", variant).groups()
    inners = [f"datasets/{name}/fineweb_val_000000.bin"]
    if variant in SIDECAR_VARIANTS:
        inners.append(f"datasets/{name}/fineweb_val_bytes_000000.bin")
    inners += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(n_train)]
    shards = [Item(i, data_dir / i, True) for i in inners]
    tok = f"fineweb_{vocab}_bpe{suffix}"
    return shards + [Item(f"tokenizers/{tok}.{ext}", data_dir / "tokenizers" / f"{tok}.{ext}", False)
                     for ext in ("model", "vocab")]


def check_token_totals(items: list[Item], stats: dict, files_train: int) -> None:
    """Warn when complete splits do not add up to the manifest's token counts (a warning: the hub's manifest and
    shards have been re-exported separately before, #837)."""
    for split, want_files in (("val", None), ("train", files_train)):
        got = [i for i in items if i.shard and f"fineweb_{split}_" in i.inner and "fineweb_val_bytes_" not in i.inner]
        want = stats.get(f"tokens_{split}")
        if want is None or (want_files is not None and len(got) != want_files):
            continue
        total = sum(read_shard_header(i.dest) for i in got)
        if total != int(want):
            note(f"warning: the {split} shards hold {total:,} tokens, the manifest says {int(want):,}")


def check_sidecars(items: list[Item]) -> None:
    """Every byte sidecar must hold exactly one entry per token of its val shard (the trainer reads them in step)."""
    for side in (i for i in items if i.shard and "/fineweb_val_bytes_" in i.inner):
        val = side.dest.with_name(side.dest.name.replace("fineweb_val_bytes_", "fineweb_val_", 1))
        n_side, n_val = read_shard_header(side.dest), read_shard_header(val)
        if n_side != n_val:
            raise DownloadError(f"{side.dest} has {n_side:,} entries but {val} has {n_val:,} tokens: the byte sidecar "
                                "does not belong to this val shard; the hub copy is inconsistent, report it to the "
                                "repo owner")


def run(args: argparse.Namespace, hub: Hub, n_train: int, data_dir: Path) -> Counter:
    if args.skip_manifest:
        items, stats = plan_without_manifest(args.variant, n_train, data_dir), None
    else:
        manifest = load_manifest(hub, data_dir)
        items, stats = plan_from_manifest(manifest, hub, args.variant, n_train, data_dir)
    if args.with_docs:  # tens of GB: fetched after everything training needs
        items += [Item(f, data_dir / f, False) for f in DOCS_FILES]
    counts: Counter = Counter()
    with tqdm(items, desc=f"{args.variant} files", unit="file") as bar:
        for item in bar:
            bar.set_postfix_str(Path(item.inner).name)
            try:
                ensure(hub, item, counts)
            except MissingOnHub as e:
                if args.skip_manifest and item.shard:
                    raise MissingOnHub(f"{e} (without the manifest the shard count is unknown: ask for fewer train "
                                       "shards, or drop --skip-manifest)") from None
                raise
    check_sidecars(items)
    if stats is not None:
        check_token_totals(items, stats, int(stats["files_train"]))
    if counts["copied"]:
        note(f"note: {counts['copied']} file(s) were copied, not hard-linked, from the HF cache (another "
                   "filesystem), so they are stored twice; set HF_HUB_CACHE to a folder on the same disk as "
                   f"{data_dir} to avoid it")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download challenge FineWeb shards + tokenizer from the Hugging Face hub "
                                            "(upstream-compatible; every shard is verified).")
    p.add_argument("train_shards_positional", nargs="?", type=int, default=None, metavar="N",
                   help="same as --train-shards N (upstream accepts a bare number)")
    p.add_argument("--train-shards", type=int, default=None,
                   help=f"train shards to fetch, a prefix of the frozen shuffled export (default {DEFAULT_TRAIN_SHARDS})")
    p.add_argument("--variant", choices=sorted(VARIANT_REPOS), default="sp1024",
                   help="tokenizer variant; picks the dataset fineweb10B_<variant> and, unless "
                        "MATCHED_FINEWEB_REPO_ID is set, the repo hosting it")
    p.add_argument("--with-docs", action="store_true",
                   help="also fetch docs_selected.jsonl + docs_selected.source_manifest.json (tens of GB; for "
                        "tokenizer retraining / re-export)")
    p.add_argument("--skip-manifest", action="store_true",
                   help="do not fetch the manifest: derive names from the variant (val shard 000000, train shards "
                        "0..N-1, tokenizers/fineweb_<V>_bpe.model/.vocab); upstream instead reuses a local "
                        "data/manifest.json")
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent,
                   help="where datasets/, tokenizers/ and the manifest cache go (default: this script's folder, data/)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    pos, opt = args.train_shards_positional, args.train_shards
    if pos is not None and opt is not None and pos != opt:
        parser.error(f"N={pos} and --train-shards {opt} disagree; give one")
    n_train = next((n for n in (pos, opt) if n is not None), DEFAULT_TRAIN_SHARDS)
    if n_train < 0:
        parser.error(f"train shards must be >= 0, got {n_train}")
    # Read at call time: huggingface_hub freezes HF_ENDPOINT / HF_HUB_CACHE into constants when it is imported.
    env_repo = os.environ.get("MATCHED_FINEWEB_REPO_ID", "").strip()
    hub = Hub(repo_id=env_repo or VARIANT_REPOS[args.variant],
              prefix=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_PREFIX).strip("/"),
              endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
              cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    source = "from MATCHED_FINEWEB_REPO_ID" if env_repo else f"hosts {args.variant}; MATCHED_FINEWEB_REPO_ID overrides"
    print(f"dataset repo: {hub.repo_id} ({source}); prefix {hub.prefix!r}; endpoint {hub.endpoint}", flush=True)
    data_dir = args.data_dir
    try:
        counts = run(args, hub, n_train, data_dir)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun to resume (finished files are kept and re-verified)", file=sys.stderr)
        return 130
    print(f"{args.variant}: {counts['present']} already present and verified, {counts['downloaded']} downloaded, "
          f"{counts['re-fetched']} re-fetched after a failed check -> {data_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
