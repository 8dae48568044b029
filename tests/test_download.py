"""data/cached_challenge_fineweb.py against a local fake of the Hugging Face hub, through the real hf_hub_download.

The fake speaks the part of the hub protocol huggingface_hub uses for `hf_hub_download(repo_type="dataset")`:
HEAD/GET `/datasets/<owner>/<name>/resolve/<revision>/<path>`, answered with `X-Repo-Commit` (required), `ETag`
and `Content-Length`; `.bin` files are served like LFS files: HEAD/GET answer 302 with `X-Linked-Etag` /
`X-Linked-Size` and a `Location` on a second server (another origin, so huggingface_hub does not follow the redirect
on HEAD and takes the metadata from the 302, as with the real CDN), which serves the bytes. Missing files and repos
answer 404 with `X-Error-Code: EntryNotFound` / `RepoNotFound`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from data.shards import read_shard_header, write_shard

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data" / "cached_challenge_fineweb.py"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OFFICIAL, KEV = "willdepueoai/parameter-golf", "kevclark/parameter-golf"


def _load_script():
    spec = importlib.util.spec_from_file_location("cached_challenge_fineweb", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dl = _load_script()


class FakeHub:
    """Repos {repo_id: {path: bytes}} served at `hub_url`, with LFS-style .bin bytes served from `cdn_url`."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        # (repo, path) -> bytes the CDN sends once in place of the file while the hub's metadata (etag, size) still
        # describes the good file: a transfer corrupted on the way, as after a CDN or disk fault.
        self.bad_once: dict[tuple[str, str], bytes] = {}
        self.blobs: dict[str, tuple[str, str, bytes]] = {}  # sha256 -> (repo, path, bytes), for the CDN
        self.gets: list[tuple[str, str]] = []  # (repo, path) per body served
        self.requests: list[tuple[str, str]] = []  # (method, url path) of every request
        self.lock = threading.Lock()
        self.hub_url = self.cdn_url = ""

    def gets_of(self, path_end: str) -> int:
        return sum(p.endswith(path_end) for _, p in self.gets)

    def handler(self, cdn: bool) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                self.serve(body=False)

            def do_GET(self) -> None:
                self.serve(body=True)

            def reply(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = False) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

            def serve(self, body: bool) -> None:
                with hub.lock:
                    hub.requests.append((self.command, self.path))
                    (self.serve_cdn if cdn else self.serve_hub)(body)

            def serve_cdn(self, body: bool) -> None:
                repo, path, data = hub.blobs[self.path.rsplit("/", 1)[-1]]
                if body:
                    hub.gets.append((repo, path))
                    data = hub.bad_once.pop((repo, path), data)
                self.reply(200, {"Content-Type": "application/octet-stream"}, data, body)

            def serve_hub(self, body: bool) -> None:
                m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if m is None:  # e.g. the downloader's reachability probe on "/"
                    return self.reply(404, {})
                repo, path = m.group(1), unquote(m.group(3))
                if repo not in hub.repos:
                    return self.reply(404, {"X-Error-Code": "RepoNotFound"})
                data = hub.repos[repo].get(path)
                if data is None:
                    return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                sha = hashlib.sha256(data).hexdigest()
                if path.endswith(".bin"):  # LFS-style: metadata on the 302, bytes from another origin
                    hub.blobs[sha] = (repo, path, data)
                    return self.reply(302, {"Location": f"{hub.cdn_url}/blob/{sha}", "X-Repo-Commit": COMMIT,
                                            "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                            "ETag": '"pointer"'})
                if body:
                    hub.gets.append((repo, path))
                self.reply(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, data, body)

        return Handler


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), fake.handler(cdn)) for cdn in (False, True)]
    for s in servers:
        s.daemon_threads = True
    fake.hub_url, fake.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield fake
    finally:
        for s, t in zip(servers, threads, strict=True):
            s.shutdown()
            s.server_close()
            t.join(timeout=5)


def shard_bytes(tmp: Path, n: int, seed: int) -> bytes:
    path = tmp / f"shard_{seed}.bin"
    write_shard(path, np.random.default_rng(seed).integers(0, 1024, n, dtype=np.int64))
    return path.read_bytes()


def publish(hub: FakeHub, tmp: Path, repo: str, variant: str, n_train: int = 2, manifest: bool = True
            ) -> dict[str, bytes]:
    """Put a tiny variant (1 val + n_train train shards + tokenizer) on the fake hub under datasets/."""
    vocab = variant.removeprefix("sp")
    name = f"fineweb10B_{variant}"
    content = {f"datasets/datasets/{name}/fineweb_val_000000.bin": shard_bytes(tmp, 300, 100)}
    for i in range(n_train):
        content[f"datasets/datasets/{name}/fineweb_train_{i:06d}.bin"] = shard_bytes(tmp, 500 + i, i)
    content[f"datasets/tokenizers/fineweb_{vocab}_bpe.model"] = f"model {variant}".encode()
    content[f"datasets/tokenizers/fineweb_{vocab}_bpe.vocab"] = f"vocab {variant}".encode()
    repo_files = hub.repos.setdefault(repo, {})
    repo_files.update(content)
    if manifest:
        old = json.loads(repo_files.get("datasets/manifest.json", b'{"datasets": [], "tokenizers": []}'))
        old["datasets"].append({"name": name, "tokenizer_name": f"sp_bpe_{vocab}",
                                "stats": {"files_val": 1, "files_train": n_train, "tokens_val": 300,
                                          "tokens_train": sum(500 + i for i in range(n_train))}})
        old["tokenizers"].append({"name": f"sp_bpe_{vocab}", "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                                  "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"})
        repo_files["datasets/manifest.json"] = json.dumps(old).encode()
    return content


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Env for in-process runs; returns the data dir."""
    monkeypatch.setenv("HF_ENDPOINT", hub.hub_url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "data"


def run(data: Path, *args: str) -> int:
    return dl.main([*args, "--data-dir", str(data)])


def local(data: Path, remote: str) -> Path:
    return data / remote.removeprefix("datasets/")


def test_full_download_lands_verified_hardlinked_files(hub, env, tmp_path, capsys):
    content = publish(hub, tmp_path, OFFICIAL, "sp1024")
    hub.repos[OFFICIAL]["datasets/docs_selected.jsonl"] = b'{"text": "hi"}\n'
    hub.repos[OFFICIAL]["datasets/docs_selected.source_manifest.json"] = b'{"num_docs": 1}'
    assert run(env, "--variant", "sp1024", "2", "--with-docs") == 0  # bare N, as upstream
    out = capsys.readouterr().out
    assert f"dataset repo: {OFFICIAL}" in out
    for remote, data in content.items():
        assert local(env, remote).read_bytes() == data
        if remote.endswith(".bin"):
            assert local(env, remote).stat().st_nlink == 2  # hard link to the HF cache blob: stored once
    assert (env / "docs_selected.jsonl").read_bytes() == b'{"text": "hi"}\n'
    assert (env / "docs_selected.source_manifest.json").is_file()
    assert (env / "manifest.willdepueoai__parameter-golf.json").is_file()
    assert not (env / "manifest.json").exists()
    # Second run: everything is present and verified; the manifest is re-checked (HEAD), no body is fetched again.
    hub.gets.clear()
    assert run(env, "--variant", "sp1024", "--train-shards", "2") == 0
    assert hub.gets == [] and ("HEAD", f"/datasets/{OFFICIAL}/resolve/main/datasets/manifest.json") in hub.requests
    assert "5 already present and verified, 0 downloaded" in capsys.readouterr().out


def test_more_train_shards_than_exist_fails_before_downloading(hub, env, tmp_path, capsys):
    publish(hub, tmp_path, OFFICIAL, "sp1024", n_train=2)
    assert run(env, "--variant", "sp1024", "--train-shards", "3") == 1
    err = capsys.readouterr().err
    assert f"sp1024 has only 2 train shards on {OFFICIAL}; requested 3" in err
    assert hub.gets_of(".bin") == 0 and not (env / "datasets").exists()


@pytest.mark.parametrize("fault", ["bad_magic", "truncated", "sha256"])
def test_shard_corrupted_in_transfer_is_refetched(hub, env, tmp_path, fault, capsys):
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    good = publish(hub, tmp_path, OFFICIAL, "sp1024")[remote]
    if fault == "sha256":  # a well-formed shard with other tokens: only the manifest's sha256 can tell
        manifest = json.loads(hub.repos[OFFICIAL]["datasets/manifest.json"])
        manifest["files"] = {remote.removeprefix("datasets/"): {"bytes": len(good),
                                                               "sha256": hashlib.sha256(good).hexdigest()}}
        hub.repos[OFFICIAL]["datasets/manifest.json"] = json.dumps(manifest).encode()
        bad = shard_bytes(tmp_path, 501, 77)
    else:
        bad = (b"\0" * 4 + good[4:]) if fault == "bad_magic" else good[:-10]
    hub.bad_once[(OFFICIAL, remote)] = bad
    assert run(env, "--variant", "sp1024", "--train-shards", "2") == 0
    assert local(env, remote).read_bytes() == good
    assert hub.gets_of("fineweb_train_000001.bin") == 2
    assert "fetching it again, bypassing the HF cache" in capsys.readouterr().err


def test_token_totals_disagreeing_with_the_manifest_warn(hub, env, tmp_path, capsys):
    publish(hub, tmp_path, OFFICIAL, "sp1024")
    manifest = json.loads(hub.repos[OFFICIAL]["datasets/manifest.json"])
    manifest["datasets"][0]["stats"]["tokens_val"] = 999
    hub.repos[OFFICIAL]["datasets/manifest.json"] = json.dumps(manifest).encode()
    assert run(env, "--variant", "sp1024", "--train-shards", "1") == 0
    assert "warning: the val shards hold 300 tokens, the manifest says 999" in capsys.readouterr().err


def test_shard_always_corrupt_on_hub_fails_naming_the_file(hub, env, tmp_path, capsys):
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    publish(hub, tmp_path, OFFICIAL, "sp1024")
    hub.repos[OFFICIAL][remote] = hub.repos[OFFICIAL][remote][:-2]
    assert run(env, "--variant", "sp1024", "--train-shards", "1") == 1
    err = capsys.readouterr().err
    assert "fineweb_val_000000.bin: still bad after a forced re-download" in err and "truncated" in err
    assert hub.gets_of("fineweb_val_000000.bin") == 2 and not local(env, remote).exists()


def test_corrupt_local_shard_is_refetched(hub, env, tmp_path, capsys):
    content = publish(hub, tmp_path, OFFICIAL, "sp1024")
    assert run(env, "--variant", "sp1024", "--train-shards", "2") == 0
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    path = local(env, remote)
    with open(path, "r+b") as f:  # truncating the hard link truncates the HF cache blob too: force must bypass it
        f.truncate(path.stat().st_size - 100)
    hub.gets.clear()
    assert run(env, "--variant", "sp1024", "--train-shards", "2") == 0
    assert path.read_bytes() == content[remote] and read_shard_header(path) == 500
    assert hub.gets == [(OFFICIAL, remote)]
    assert "deleting it and downloading again" in capsys.readouterr().err


def test_manifest_is_per_repo_and_variants_pick_their_repo(hub, env, tmp_path, monkeypatch, capsys):
    publish(hub, tmp_path, OFFICIAL, "sp1024")
    publish(hub, tmp_path, KEV, "sp8192")
    publish(hub, tmp_path, KEV, "sp4096")
    # Upstream's stale data/manifest.json (sp1024 only) must not hide sp8192.
    env.mkdir(parents=True)
    (env / "manifest.json").write_bytes(hub.repos[OFFICIAL]["datasets/manifest.json"])
    assert run(env, "--variant", "sp1024", "--train-shards", "1") == 0
    assert run(env, "--variant", "sp8192", "--train-shards", "2") == 0
    assert f"dataset repo: {KEV} (hosts sp8192" in capsys.readouterr().out
    assert read_shard_header(env / "datasets/fineweb10B_sp8192/fineweb_train_000001.bin") == 501
    assert (env / "tokenizers/fineweb_8192_bpe.model").read_bytes() == b"model sp8192"
    assert json.loads((env / f"manifest.{KEV.replace('/', '__')}.json").read_text())["datasets"][0]["name"] == \
        "fineweb10B_sp8192"
    # Forcing the official repo for sp8192: its manifest lacks it; the error lists what it has and where to look.
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", OFFICIAL)
    assert run(env, "--variant", "sp8192", "--train-shards", "1") == 1
    err = capsys.readouterr().err
    assert f"the manifest of {OFFICIAL} has no dataset fineweb10B_sp8192; it has: sp1024; sp8192 is hosted on {KEV}" \
        in err


def test_skip_manifest_derives_names_and_never_asks_for_a_manifest(hub, env, tmp_path, capsys):
    content = publish(hub, tmp_path, KEV, "sp4096", manifest=False)
    assert run(env, "--variant", "sp4096", "--train-shards", "2", "--skip-manifest") == 0
    for remote, data in content.items():
        assert local(env, remote).read_bytes() == data
    assert not any("manifest" in p for _, p in hub.requests) and not list(env.glob("manifest*"))
    assert run(env, "--variant", "sp4096", "--train-shards", "3", "--skip-manifest") == 1
    err = capsys.readouterr().err
    assert f"fineweb_train_000002.bin is not in dataset repo {KEV}" in err and "shard count is unknown" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_offline_reruns_use_local_files(hub, env, tmp_path, monkeypatch, capsys):
    publish(hub, tmp_path, OFFICIAL, "sp1024")
    assert run(env, "--variant", "sp1024", "--train-shards", "1") == 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    capsys.readouterr()
    assert run(env, "--variant", "sp1024", "--train-shards", "1", "--skip-manifest") == 0
    assert run(env, "--variant", "sp1024", "--train-shards", "1") == 0  # falls back to this repo's cached manifest
    assert "using the manifest cached for willdepueoai/parameter-golf" in capsys.readouterr().err
    assert run(env, "--variant", "sp1024", "--train-shards", "2") == 1  # shard 1 is not here and the hub is gone
    assert "error: cannot reach the Hugging Face hub" in capsys.readouterr().err


def test_unreachable_hub_cli_one_line_error_no_traceback(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "MATCHED_FINEWEB_REPO_ID": KEV}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--variant", "sp8192", "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the Hugging Face hub at http://127.0.0.1:")
    assert KEV in last and "HF_ENDPOINT" in last and "--skip-manifest" in last


# -----------------------------------------------------------------------------
# the CaseOps variant: its own repo, tokenizer name and val byte sidecars
# -----------------------------------------------------------------------------

ROMEERP, CASEOPS = "romeerp/parameter-golf-caseops-v1", "sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_DIR = f"fineweb10B_{CASEOPS}"
CASEOPS_TOK = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def publish_caseops(hub: FakeHub, tmp: Path, n_train: int = 2, sidecar_entries: int = 300) -> dict[str, bytes]:
    """The layout of the CaseOps export: upstream's exporter manifest (val_bytes_glob, text_transform), one val shard
    with its byte sidecar, train shards, and the reserved-operator tokenizer."""
    base = f"datasets/datasets/{CASEOPS_DIR}"
    side = tmp / "sidecar.bin"
    write_shard(side, np.random.default_rng(5).integers(0, 9, sidecar_entries, dtype=np.int64))
    content = {f"{base}/fineweb_val_000000.bin": shard_bytes(tmp, 300, 100),
               f"{base}/fineweb_val_bytes_000000.bin": side.read_bytes()}
    for i in range(n_train):
        content[f"{base}/fineweb_train_{i:06d}.bin"] = shard_bytes(tmp, 500 + i, i)
    content[f"datasets/tokenizers/{CASEOPS_TOK}.model"] = b"caseops model"
    content[f"datasets/tokenizers/{CASEOPS_TOK}.vocab"] = b"caseops vocab"
    manifest = {"datasets": [{"name": CASEOPS_DIR, "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
                              "val_glob": f"datasets/{CASEOPS_DIR}/fineweb_val_*.bin",
                              "val_bytes_glob": f"datasets/{CASEOPS_DIR}/fineweb_val_bytes_*.bin",
                              "stats": {"files_val": 1, "files_train": n_train, "tokens_val": 300,
                                        "tokens_train": sum(500 + i for i in range(n_train))}}],
                "tokenizers": [{"name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
                                "model_path": f"tokenizers/{CASEOPS_TOK}.model",
                                "vocab_path": f"tokenizers/{CASEOPS_TOK}.vocab",
                                "text_transform": "lossless_caps_caseops_v1"}]}
    hub.repos.setdefault(ROMEERP, {}).update({**content, "datasets/manifest.json": json.dumps(manifest).encode()})
    return content


def test_caseops_variant_lands_with_its_sidecars(hub, env, tmp_path, capsys):
    content = publish_caseops(hub, tmp_path)
    assert run(env, "--variant", CASEOPS, "--train-shards", "2") == 0
    assert f"dataset repo: {ROMEERP} (hosts {CASEOPS}" in capsys.readouterr().out
    for remote, data in content.items():
        assert local(env, remote).read_bytes() == data
    ds = env / "datasets" / CASEOPS_DIR
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                     "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert (env / "tokenizers" / f"{CASEOPS_TOK}.model").read_bytes() == b"caseops model"
    # The sidecar is not counted as val tokens (no false "the val shards hold ... tokens" warning).
    assert "warning" not in capsys.readouterr().err


def test_caseops_sidecar_corrupted_in_transfer_is_refetched(hub, env, tmp_path, capsys):
    remote = f"datasets/datasets/{CASEOPS_DIR}/fineweb_val_bytes_000000.bin"
    good = publish_caseops(hub, tmp_path)[remote]
    hub.bad_once[(ROMEERP, remote)] = good[:-4]
    assert run(env, "--variant", CASEOPS, "--train-shards", "1") == 0
    assert local(env, remote).read_bytes() == good and hub.gets_of("fineweb_val_bytes_000000.bin") == 2
    assert "fetching it again, bypassing the HF cache" in capsys.readouterr().err


def test_caseops_sidecar_not_matching_its_val_shard_fails(hub, env, tmp_path, capsys):
    publish_caseops(hub, tmp_path, sidecar_entries=299)  # a well-formed shard, one entry short
    assert run(env, "--variant", CASEOPS, "--train-shards", "1") == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (the lines before it are the progress bar's)
    assert last.startswith("error: ") and "fineweb_val_bytes_000000.bin has 299 entries but" in last
    assert "has 300 tokens" in last and "Traceback" not in err


def test_caseops_skip_manifest_derives_the_caseops_names(hub, env, tmp_path):
    content = publish_caseops(hub, tmp_path)
    del hub.repos[ROMEERP]["datasets/manifest.json"]
    assert run(env, "--variant", CASEOPS, "--train-shards", "2", "--skip-manifest") == 0
    for remote, data in content.items():
        assert local(env, remote).read_bytes() == data
    assert not any("manifest" in p for _, p in hub.requests)
