"""`dico download file|zip`: resumable, size- and sha256-checked downloads (what the download rules run)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..download import fetch, fetch_zip, published_sha1
from .common import check_outputs, command


def _transfer_options(p: argparse.ArgumentParser):
    p.add_argument("--url", required=True, help="where to fetch it from (http(s); a Google Drive link works)")
    p.add_argument("--sha256", help="expected sha256 (default: the one recorded at the first download, if any)")
    p.add_argument("--sha1-url", help="where the server publishes the file's sha1 (Maven Central: <url>.sha1); "
                   "the download must match it too")
    p.add_argument("--retries", type=int, default=5, help="extra attempts after a network error or a bad sha256")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sha(value: str | None) -> str | None:
    return None if value in (None, "", "null", "None") else value


def _published(args, out) -> str | None:
    """The sha1 published at --sha1-url, read only when something is to be fetched."""
    if not args.sha1_url or (Path(out).exists() and not getattr(args, "force", False)):
        return None
    return published_sha1(args.sha1_url, retries=args.retries, timeout=args.timeout)


def cmd_file(args):
    check_outputs(args, "out")
    fetch(args.url, args.out, _sha(args.sha256), retries=args.retries, timeout=args.timeout,
          progress=not args.no_progress, force=args.force, sha1=_published(args, args.out))


def cmd_zip(args):
    from ..io import check_output

    check_outputs(args, "archive", *(["out"] if args.member else []))
    if not args.member:  # the folder to unpack into appears when complete: its parent must take it
        check_output(Path(args.out).parent, "--out", folder=True)
    fetch_zip(args.url, args.archive, args.out, member=args.member, sha256=_sha(args.sha256),
              keep_archive=args.keep_archive, retries=args.retries, timeout=args.timeout,
              progress=not args.no_progress, sha1=_published(args, args.archive))


def register(subparsers) -> argparse.ArgumentParser:
    """Add `download file` and `download zip` to the `dico` parser."""
    parser = command(subparsers, "download", "resumable, sha256-checked downloads (weights, COCO, Karpathy)",
                     description="Fetch a file or a zip (what the pipeline's download rules run): resumable, "
                     "checked against its size and sha256, renamed into place only when complete.")
    sub = parser.add_subparsers(dest="download_kind", required=True, metavar="KIND")

    p = command(sub, "file", "one file (CLIP / PAC-S / DiCO weights)", cmd_file)
    _transfer_options(p)
    p.add_argument("--out", required=True, help="where the file goes (nothing is fetched if it exists)")
    p.add_argument("--force", action="store_true", help="fetch even if --out exists")

    p = command(sub, "zip", "a zip archive, unpacked into a folder or reduced to one member", cmd_zip)
    _transfer_options(p)
    p.add_argument("--archive", required=True, help="where the zip is downloaded to (resumable)")
    p.add_argument("--out", required=True, help="the folder to unpack into, or the file for --member")
    p.add_argument("--member", help="extract only the entry with this file name (e.g. dataset_coco.json)")
    p.add_argument("--keep-archive", action="store_true", help="keep the zip after unpacking")
    return parser
