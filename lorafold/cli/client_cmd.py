"""`lorafold client ...`: talk to a running lorafold service.

The URL and API key come from --url/--api-key, else LORAFOLD_URL/LORAFOLD_API_KEY (read
by `ClientSettings`), else the key of a `lorafold up` started in this directory. Results
are printed as JSON on stdout (`-q`: only the id, for scripts); `wait` draws a progress
bar on stderr and exits non-zero unless the job succeeded.

Nothing here imports torch, safetensors or the server side: the merge options come from
`lorafold.merge.options`, and tqdm is imported only by `wait`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lorafold.cli.hyperparams_option import parse_hyperparams
from lorafold.cli.merge_cmd import (
    BAR_FORMAT,
    add_merge_options,
    parse_rank,
    parse_weights,
)
from lorafold.cli.service_cmd import local_api_key
from lorafold.client import LorafoldClient
from lorafold.errors import InvalidRequest
from lorafold.settings import ClientSettings
from lorafold.tune.cli import add_tune_options
from lorafold.tune.options import parse_params


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _client(args: argparse.Namespace) -> LorafoldClient:
    settings = ClientSettings()
    key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None) \
        or local_api_key()
    if not key:
        raise InvalidRequest("no API key: pass --api-key or set LORAFOLD_API_KEY "
                             "(`lorafold up` prints one)", code="missing_api_key")
    return LorafoldClient(args.url or settings.url, key, timeout=settings.timeout_s)


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidRequest(f"--metadata is not JSON: {e}", code="invalid_metadata") from e
    if not isinstance(value, dict):
        raise InvalidRequest("--metadata must be a JSON object", code="invalid_metadata")
    return value


def progress_label(job: dict[str, Any]) -> str:
    """The stage while the job runs ("fetch", "merge", "publish"), else its status."""
    return str(job["progress"]["stage"] if job["status"] == "running" else job["status"])


def wait_with_bar(client: LorafoldClient, job_id: str, timeout: float) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=100, unit="%", file=sys.stderr, bar_format=BAR_FORMAT) as bar:
        def on_progress(job: dict[str, Any]) -> None:
            bar.set_description_str(progress_label(job), refresh=False)
            bar.n = round(100 * job["progress"]["fraction"])
            bar.refresh()

        return client.wait(job_id, timeout=timeout, on_progress=on_progress)


def _finished(job: dict[str, Any], quiet: bool = False) -> int:
    """Print the finished job (-q: the id of the adapter it made) and the exit status."""
    if quiet and job["status"] == "succeeded":
        print(job["result"]["adapter_id"])
    else:
        _print(job)
    return 0 if job["status"] == "succeeded" else 1


def _show(item: dict[str, Any], quiet: bool) -> None:
    if quiet:
        print(item["id"])
    else:
        _print(item)


def _plan(client: LorafoldClient, args: argparse.Namespace) -> int:
    """Submit a plan; with --wait (or --apply) print it, and with --apply submit one merge
    per group at the group's rank."""
    rank, min_energy = args.rank
    job = client.plan(args.adapter_ids, rank="auto" if rank is None else rank,
                      min_energy=min_energy, max_rank=args.max_rank,
                      max_groups=args.max_groups, force=args.force)
    if not (args.wait or args.apply):
        _show(job, args.quiet)
        return 0
    done = wait_with_bar(client, job["id"], args.timeout)
    if done["status"] != "succeeded" or not args.apply:
        return _finished(done)
    plan = done["result"]["plan"]
    merges = [client.merge(group["members"], rank=group["rank"], force=args.force,
                           name=f"plan {job['id']} group {number}")
              for number, group in enumerate(plan["groups"], start=1)]
    _print({"plan": plan, "merge_jobs": [m["id"] for m in merges]})
    return 0


def _dataset_ref(client: LorafoldClient, value: str | None, role: str) -> str | None:
    """A data set id as given, or the id of the JSONL file at that path, uploaded now."""
    if value is None or not Path(value).is_file():
        return value
    return str(client.upload_dataset(Path(value), name=f"{Path(value).stem} ({role})")["id"])


def _tune_field(client: LorafoldClient, args: argparse.Namespace) -> dict[str, Any] | None:
    """`tune` of a merge request from --tune-data (ids, or JSONL files uploaded now)."""
    if not args.tune_data:
        return None
    return {"datasets": [_dataset_ref(client, value, "validation") for value in args.tune_data],
            "base_model": args.base_model, "params": parse_params(args.tune_params),
            "budget": args.tune, "time_limit_s": args.tune_time_limit}


def _unlearn_fields(client: LorafoldClient, args: argparse.Namespace) -> dict[str, Any]:
    return {"remove": args.remove or None, "forget_adapter": args.forget_adapter,
            "strength": args.strength, "rank": args.rank, "base_model": args.base_model,
            **{f"{role}_dataset": _dataset_ref(client, getattr(args, role), role)
               for role in ("forget", "retain", "holdout")},
            "hyperparams": parse_hyperparams(args.hp)}


def run(args: argparse.Namespace) -> int:
    with _client(args) as client:
        action = args.action
        if action == "upload":
            _show(client.upload(args.path, name=args.name, metadata=_metadata(args.metadata)),
                  args.quiet)
        elif action == "list":
            _print(client.list_adapters())
        elif action == "get":
            _print(client.get_adapter(args.adapter_id))
        elif action == "delete":
            client.delete_adapter(args.adapter_id)
        elif action == "import":
            _show(client.import_adapter(args.source, name=args.name,
                                        metadata=_metadata(args.metadata)), args.quiet)
        elif action == "download":
            out = args.out or Path(args.adapter_id if args.extract
                                   else f"{args.adapter_id}.{args.format}")
            print(client.download(args.adapter_id, out, extract=args.extract,
                                  archive_format=args.format))
        elif action == "plan":
            return _plan(client, args)
        elif action == "merge":
            rank, min_energy = args.rank
            job = client.merge(args.adapter_ids, weights=parse_weights(args.weights),
                               method=args.method, rule=args.rule,
                               rank="auto" if min_energy is not None else rank,
                               min_energy=min_energy,
                               density=args.density, drop=args.drop, scale=args.scale,
                               seed=args.seed, beta=args.beta, subspace=args.subspace,
                               force=args.force, dtype=args.dtype, target=args.target,
                               base_model_name=args.base_model_name, name=args.name,
                               tune=_tune_field(client, args))
            if args.wait:
                return _finished(wait_with_bar(client, job["id"], args.timeout), args.quiet)
            _show(job, args.quiet)
        elif action == "dataset-upload":
            _show(client.upload_dataset(args.path, name=args.name), args.quiet)
        elif action == "datasets":
            _print(client.list_datasets())
        elif action == "dataset-delete":
            client.delete_dataset(args.dataset_id)
        elif action == "unlearn":
            job = client.unlearn(args.method, args.adapter_id, name=args.name,
                                 **_unlearn_fields(client, args))
            if args.wait:
                return _finished(wait_with_bar(client, job["id"], args.timeout), args.quiet)
            _show(job, args.quiet)
        elif action == "wait":
            return _finished(wait_with_bar(client, args.job_id, args.timeout))
        elif action == "jobs":
            _print(list(client.list_jobs(status=args.status, limit=args.limit)))
        elif action == "job":
            _print(client.get_job(args.job_id))
        elif action == "events":
            _print(client.events(args.job_id))
        elif action == "cancel":
            _print(client.cancel(args.job_id))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client", help="use a running lorafold service",
                       description="Upload, merge, unlearn, follow and download through the "
                                   "REST API.")
    p.add_argument("--url", help="service URL (default $LORAFOLD_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="API key (default $LORAFOLD_API_KEY)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    up = actions.add_parser("upload", help="upload an adapter dir, .zip or .tar.gz")
    up.add_argument("path", type=Path)
    up.add_argument("--name")
    up.add_argument("--metadata", help="a JSON object")
    up.add_argument("-q", "--quiet", action="store_true",
                    help="print only the id (of the adapter)")
    actions.add_parser("list", help="list adapters")
    for name, text in (("get", "show one adapter"), ("delete", "delete an adapter")):
        actions.add_parser(name, help=text).add_argument("adapter_id")
    imp = actions.add_parser(
        "import", help="have the service fetch an adapter by reference",
        description="SOURCE: https://host/path (a .zip/.tar.gz/.tar of the adapter), "
                    "s3://bucket/key (an archive) or s3://bucket/prefix/ (the PEFT files "
                    "below it), hf://org/name[@revision]; each only where the service's "
                    "settings allow it (docs/service.md, 'Import by reference').")
    imp.add_argument("source")
    imp.add_argument("--name")
    imp.add_argument("--metadata", help="a JSON object")
    imp.add_argument("-q", "--quiet", action="store_true",
                     help="print only the id (of the adapter)")
    down = actions.add_parser("download", help="download an adapter (.tar, .tar.gz or .zip)")
    down.add_argument("adapter_id")
    down.add_argument("--format", choices=["tar", "tar.gz", "zip"], default="tar",
                      help="archive format, the files at its root (default: %(default)s)")
    down.add_argument("--out", type=Path, help="file (or directory with --extract)")
    down.add_argument("--extract", action="store_true", help="unpack into a directory")

    plan = actions.add_parser("plan", help="plan which adapters to merge together (a job)")
    plan.add_argument("adapter_ids", nargs="+", metavar="ADAPTER_ID")
    plan.add_argument("--rank", type=parse_rank, default=(None, None), metavar="R|auto[:E]",
                      help="one rank for every group, or auto[:E]: each group at its "
                           "smallest rank keeping E of every member (docs/planning.md)")
    plan.add_argument("--max-rank", type=int, help="rank auto: the cap")
    plan.add_argument("--max-groups", type=int,
                      help="stop once at most this many adapters remain")
    plan.add_argument("--force", action="store_true",
                      help="plan adapters of different base models")
    plan.add_argument("--wait", action="store_true", help="wait for the plan and print it")
    plan.add_argument("--apply", action="store_true",
                      help="wait, then submit one merge job per group")
    plan.add_argument("--timeout", type=float, default=3600.0, help="seconds, with --wait")
    plan.add_argument("-q", "--quiet", action="store_true", help="print only the job id")

    merge = actions.add_parser("merge", help="merge adapters (a job)")
    merge.add_argument("adapter_ids", nargs="+", metavar="ADAPTER_ID")
    add_merge_options(merge, method_default=None)
    add_tune_options(merge, service=True)
    merge.add_argument("--name")
    merge.add_argument("--wait", action="store_true", help="wait for the job to finish")
    merge.add_argument("--timeout", type=float, default=3600.0, help="seconds, with --wait")
    merge.add_argument("-q", "--quiet", action="store_true",
                    help="print only the id (of the job; with --wait, of the merged adapter)")

    data = actions.add_parser("dataset-upload", help="upload a JSONL data set")
    data.add_argument("path", type=Path)
    data.add_argument("--name")
    data.add_argument("-q", "--quiet", action="store_true",
                    help="print only the id (of the data set)")
    actions.add_parser("datasets", help="list data sets")
    actions.add_parser("dataset-delete", help="delete a data set").add_argument("dataset_id")

    un = actions.add_parser(
        "unlearn", help="unlearn (a job): remove, negate or a data-driven method",
        description="remove: --remove ID (constituents of a merged adapter); negate: "
                    "--forget-adapter ID [--strength λ] [--rank R]; gradient_ascent, "
                    "grad_diff, npo, feature_alignment: --forget (a data set id or a JSONL "
                    "file, uploaded first) [--retain] [--holdout] [--base-model] [--hp K=V].")
    un.add_argument("method")
    un.add_argument("adapter_id")
    un.add_argument("--remove", action="append", metavar="ADAPTER_ID")
    un.add_argument("--forget-adapter", metavar="ADAPTER_ID")
    un.add_argument("--strength", type=float)
    un.add_argument("--rank", type=int)
    un.add_argument("--base-model")
    for role in ("forget", "retain", "holdout"):
        un.add_argument(f"--{role}", metavar="DATASET_ID_OR_JSONL")
    un.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="hyperparameter override, e.g. --hp max_steps=50 --hp lr=5e-5")
    un.add_argument("--name")
    un.add_argument("--wait", action="store_true", help="wait for the job to finish")
    un.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds, with --wait")
    un.add_argument("-q", "--quiet", action="store_true",
                    help="print only the id (of the job; with --wait, of the new adapter)")

    wait = actions.add_parser("wait", help="wait for a job, with a progress bar")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, default=3600.0, help="seconds")
    jobs = actions.add_parser("jobs", help="list jobs")
    jobs.add_argument("--status", choices=["queued", "running", "succeeded", "failed",
                                           "cancelled"])
    jobs.add_argument("--limit", type=int, default=50, help="jobs per page fetched")
    for name, text in (("job", "show a job"), ("events", "a job's events"),
                       ("cancel", "cancel a job")):
        actions.add_parser(name, help=text).add_argument("job_id")
    p.set_defaults(handler=run)
