"""``transferlab cache``: the embedding caches' sizes per namespace, and pruning the local one.

``list`` shows rows and bytes per namespace (backbone, weights, size, engine), locally and, with
a shared cache (``--remote``, else params.yaml's ``extract_features.cache_remote``, else
``$TRANSFERLAB_CACHE_REMOTE``), remotely. ``push`` seeds the shared cache with the local rows it
lacks (a run pushes only when its local cache missed rows). ``prune`` removes local namespaces, each atomically;
the shared cache is never pruned from here (its objects are immutable; expire them with the
bucket's lifecycle rules). The library is :mod:`transferlab.features.cache_inventory`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transferlab.core import params as params_module
from transferlab.features import cache_inventory, cache_remote, embedding_cache


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds this command's actions and options."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="rows and bytes per namespace, locally and remotely")
    listing.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]", help="the shared cache (default: the params')")
    listing.add_argument("--local-only", action="store_true", help="do not list the shared cache")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    push = actions.add_parser("push", help="seed the shared cache with the local rows (and conversions) it lacks")
    push.add_argument("--remote", metavar="s3://BUCKET[/PREFIX]", help="the shared cache (default: the params')")
    push.add_argument("--namespace", nargs="+", default=[], metavar="NS", help="only these namespaces (or prefixes)")
    prune = actions.add_parser("prune", help="remove local namespaces (each database atomically)")
    prune.add_argument("--namespace", nargs="+", default=[], metavar="NS", help="namespaces (or unique prefixes)")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="namespaces not written for DAYS days")
    prune.add_argument("--all", action="store_true", help="every namespace")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    for each in (listing, push, prune):
        each.add_argument("--cache-dir", type=Path, help="the local cache folder (default: the params')")
        each.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")


def run(args: argparse.Namespace) -> int:
    """Runs ``list`` or ``prune``; returns the exit code (1 when the remote or a database could not be used)."""
    settings = _settings(args.params)
    directory = args.cache_dir or embedding_cache.cache_directory(settings.cache_dir)
    local = cache_inventory.local_namespaces(directory)
    if args.action == "prune":
        return _prune(args, local)
    if args.action == "push":
        return _push(args, directory, local, settings)
    url = "" if args.local_only else cache_remote.remote_url(args.remote or settings.cache_remote)
    remote, problem = None, None
    if url:
        try:
            remote = cache_inventory.remote_namespaces(url, directory)
        except ValueError as error:
            problem = str(error)
    rows = cache_inventory.inventory(local, remote)
    if args.json:
        print(json.dumps({"local": str(directory), "remote": url or None, "namespaces": rows}, indent=2))
    else:
        print(f"local cache: {directory}" + (f"\nshared cache: {url}" if url else ""))
        print(cache_inventory.table(rows, remote=bool(url)))
    if problem:
        print(f"transferlab cache: {problem}", file=sys.stderr)
    return 1 if problem else 0


def _settings(path: Path):
    raw = params_module.read_params_file(path) if path.exists() else {}
    return params_module.parse_section("extract_features", raw.get("extract_features"))


def _push(args: argparse.Namespace, directory: Path, local: list[dict], settings) -> int:
    url = cache_remote.remote_url(args.remote or settings.cache_remote)
    if not url:
        raise ValueError("no shared cache: give --remote s3://BUCKET[/PREFIX] (or set extract_features.cache_remote)")
    chosen = cache_inventory.select(local, namespaces=args.namespace) if args.namespace else local
    results = cache_inventory.push_local(directory, url, chosen)
    for result in results:
        print(f"{result['namespace'][:12]}: {result['pushed']} rows pushed ({result['bytes'] / 1e6:.1f} MB)")
    print(f"{sum(result['pushed'] for result in results)} rows pushed to {url}")
    return 0


def _prune(args: argparse.Namespace, local: list[dict]) -> int:
    chosen = cache_inventory.select(
        local, namespaces=args.namespace, older_than_days=args.older_than, everything=args.all
    )
    if args.dry_run:
        for entry in chosen:
            print(f"would remove {_line(entry)}")
        return 0
    removed, refused = cache_inventory.prune(chosen)
    for entry in removed:
        print(f"removed {_line(entry)}")
    for entry, reason in refused:
        print(f"kept {entry['namespace'][:12]}: {reason}", file=sys.stderr)
    total = sum(entry["bytes"] for entry in removed)
    print(f"{len(removed)} namespace(s) removed, {total / 1e6:.1f} MB freed; {len(refused)} kept")
    return 1 if refused else 0


def _line(entry: dict) -> str:
    age = (time.time() - entry["modified"]) / cache_inventory.SECONDS_PER_DAY
    rows = "?" if entry["rows"] is None else entry["rows"]
    description = cache_inventory.describe(entry["description"])
    return f"{entry['namespace'][:12]}  {rows} rows  {entry['bytes'] / 1e6:.1f} MB  {age:.1f} days  {description}"
